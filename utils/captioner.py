"""The captioner contract: what a model script's class provides to the loop, and what the loop gives it.

A model script (qwen.py, internvl.py, llava.py, minigpt4.py) defines one subclass of Captioner and ends with
`run(TheCaptioner)` (utils/caption_loop.py). The loop reads nothing of the class but what is written here.
"""
import dataclasses
import functools
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, ClassVar, NamedTuple, Optional


class Caption(NamedTuple):
    text: str
    truncated: bool  # generation stopped at --max-new-tokens without reaching the end token


@dataclasses.dataclass(frozen=True)
class Decoding:
    """The decoding flags every script takes; None keeps the model's own default."""
    max_new_tokens: int
    min_new_tokens: Optional[int]
    temperature: Optional[float]
    top_p: Optional[float]
    num_beams: int

    def generate_kwargs(self, **model_defaults):
        """generate() kwargs: model_defaults (the original script's values for that model, and fixed kwargs of its
        reference inference) overridden by the flags that were given; temperature 0 means greedy."""
        kwargs = {**model_defaults, "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        given = {"min_new_tokens": self.min_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        kwargs.update({name: value for name, value in given.items() if value is not None})
        if "temperature" in kwargs:
            kwargs["do_sample"] = kwargs["temperature"] > 0
            if not kwargs["do_sample"]:
                kwargs.pop("temperature")
                kwargs.pop("top_p", None)
        return kwargs


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What a captioner is built with, resolved once by the loop before it loads the model."""
    model: str  # --model as given: a hub id, a folder or (MiniGPT-4) a file
    dtype: Any  # a torch dtype
    attn_implementation: str
    decoding: Decoding
    decode_rows: Optional[int]  # --decode-rows, for classes that refill rows; else None
    options: MappingProxyType  # the class's own flags (add_arguments), by argparse dest


class Captioner:
    """Base class of the model scripts' captioners. Class attributes say what the script is; an instance holds the
    loaded model and captions batches of prepared images."""

    name: ClassVar[str]  # output folder and generate.sh model name, e.g. "qwen"
    default_model: ClassVar[str]  # hub id or folder used when --model is not given
    prompts: ClassVar[dict]  # preset key -> prompt text (utils/prompts.py)
    default_prompt: ClassVar[str]  # the preset used when --prompt/--prompts are not given
    default_dtype: ClassVar[str]  # dtype on a GPU when --dtype is auto ("bfloat16", "float16"); a CPU uses float32
    defaults: ClassVar[dict] = {}  # parser defaults that differ per model, by argparse dest, e.g. {"batch_size": 3}
    caption_flags: ClassVar[tuple] = ()  # dests of the class's own flags that change captions: in the run record
    refills_rows: ClassVar[bool] = False  # takes --decode-rows (utils/generation/refill.py)
    model_on_hub: ClassVar[bool] = True  # --model may be a hub id; False: a local file the class checks itself
    # generate() kwargs that grow at every decode step but that the model's decode step does not read: left out so
    # that decode steps can be CUDA graphs (utils/generation/cuda_graphs.py)
    unread_in_decode: ClassVar[tuple] = ()

    model: Any  # the loaded torch module, set by __init__: the loop compiles its prefill and graphs its decode steps
    prepare: Callable  # picklable PIL.Image -> prepared image, run in the image workers; the image is fully decoded
    #                    but in its original mode (convert it as the model's reference code does)

    def __init__(self, settings: ModelSettings, device):
        """Load the model and its processor onto `device`."""
        raise NotImplementedError

    @staticmethod
    def add_arguments(parser):
        """Add the model's own flags to the command line."""

    @classmethod
    def name_checkpoint(cls, model, options):
        """The output folder name of the checkpoint: the last part of --model. Called once per process."""
        return Path(model.rstrip("/")).name or "model"

    @classmethod
    def check_options(cls, model, options):
        """The class's own checks, before anything is loaded or written (the files its flags name exist, say);
        a mistake raises UserError."""

    @classmethod
    def run_instead(cls, model, options):
        """A command of the class's own that replaces captioning (InternVL's --convert-to): run it and return True;
        False: caption."""
        return False

    def cost(self, prepared):
        """The prompt length an image gives, roughly: batches are sorted by it so that they pad less."""
        return 0

    def cpu_inputs(self, images, prompts):
        """The batch's CPU work (token ids, masks, positions as CPU tensors; nothing on the GPU), made on the
        batcher thread while the GPU runs the batch before, then passed to caption(); None: there is none."""
        return None

    def caption(self, images, prompts, inputs=None):
        """result[i][j], the Caption of image i (a `prepare` result) for prompt text j. inputs: cpu_inputs(images,
        prompts). A batch that runs out of CUDA memory is halved and retried by the loop."""
        raise NotImplementedError


def by_image(captions, prompts):
    """Captions of image-major (image, prompt) rows as caption() returns them: result[i][j], image i, prompt j."""
    return [captions[i:i + len(prompts)] for i in range(0, len(captions), len(prompts))]


def stopped_at_limit(new_token_ids, end_token_ids):
    """True when a generated row (a list: a GPU tensor would cost a wait per token) holds no end token."""
    return not any(token in end_token_ids for token in new_token_ids)


def inference_mode(method):
    """torch.inference_mode() for a method, importing torch when the method first runs, not when its module
    is imported (--help and mistakes answer at once)."""
    @functools.wraps(method)
    def without_autograd(*args, **kwargs):
        import torch
        with torch.inference_mode():
            return method(*args, **kwargs)
    return without_autograd
