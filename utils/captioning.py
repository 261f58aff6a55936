"""The captioning loop that every model script shares.

A model script (qwen.py, internvl.py, llava.py, minigpt4.py) defines one class and ends with
``run(TheCaptioner)``. The class holds everything specific to that model; this module holds the
rest: command line, rank/world size from the environment, reading and sharding the input, skipping
what is already done, loading images in worker processes, batching, writing, progress, signals.

The contract a captioner class fulfils:

    name: str              output folder name and generate.sh model name, e.g. "qwen"
    default_model: str     hub id or folder used when --model is not given
    prompts: dict          preset key -> prompt text
    default_prompt: str    key of the preset used when --prompt/--prompts are not given
    defaults: dict         parser defaults that differ per model, e.g. {"batch_size": 3,
                           "temperature": 0.2}; keys are argparse dests
    default_dtype: str     dtype on CUDA when --dtype is auto ("bfloat16", "float16"); CPU uses float32

    @staticmethod
    add_arguments(parser)  model-specific flags (optional)

    __init__(self, args, device)
                           load model and processor onto `device`
    prepare                a picklable callable PIL.Image -> prepared image; runs in the
                           DataLoader worker processes. The image it gets is fully decoded but in
                           its original mode (convert it as the model's reference code does).
    caption(self, images, prompts) -> list[list[Caption]]
                           images: list of `prepare` results; prompts: list of prompt texts.
                           Returns result[i][j] for image i and prompt j, a Caption(text,
                           truncated) where truncated means generation stopped at
                           --max-new-tokens without reaching the end token.
"""
from typing import NamedTuple


class Caption(NamedTuple):
    text: str
    truncated: bool

