"""Caption images with LLaVA-1.5, from llava-hf checkpoints or from the original LLaVA-1.5 checkpoints.

Both formats run as transformers' LlavaForConditionalGeneration. An original checkpoint
(liuhaotian/llava-v1.5-13b: LlavaLlamaForCausalLM, Llama weights plus model.mm_projector.*, the CLIP
vision tower named in `mm_vision_tower`) is converted at load time (convert/llava.py). Images, prompt and
token ids are prepared as LLaVA-1.5's own inference does: pad to a square filled with the image-processor
mean colour, CLIP preprocessing, the llava_v1 conversation, and `tokenizer_image_token` (the prompt is
split at the image and each piece tokenized on its own).

With several prompts, the vision tower runs once per image and the tokens its prompts share (system text, the
576 image tokens, the text before the question) are prefilled once per image; each (image, prompt) row then
prefills only its question and all rows decode together (utils/generation/shared_prefix.py).
"""
import functools
import os
import re
from typing import Any, NamedTuple

from PIL import Image

from utils import prompts as presets
from utils.caption_loop import run
from utils.captioner import Caption, Captioner, by_image, inference_mode, stopped_at_limit
from utils.checkpoints import fetch_folder, read_json
from utils.errors import UserError
from utils.generation.tensors import stack_to_device

# torch, transformers and huggingface_hub are imported where they are used: --help and mistakes answer at once.

# The llava_v1 conversation of llava/conversation.py (sep " ", sep2 "</s>"), for one user turn that
# starts with the image, as LLaVA-1.5's evaluation scripts build it: "<image>\n" + question.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# what a hub id is downloaded with: configs, tokenizer and one weight format (safetensors where there are some)
CHECKPOINT_FILES = ["*.json", "tokenizer.model", "*.safetensors", "*.bin"]


def split_prompt(question):
    """The llava_v1 prompt as (text before the image, text after it).

    An `<image>` tag at the start or end of the question is dropped: the image already opens the user
    turn. One inside the text, as in the original scripts' "Describe the <image> in English in detail:", is
    read as the word "image"; the original scripts put the image there, mid-sentence and without any
    conversation."""
    question = re.sub(r"^\s*<image>\s*|\s*<image>\s*$", "", question).replace("<image>", "image")
    return f"{SYSTEM} USER: ", f"\n{question} ASSISTANT:"


def expand_to_square(image, fill):
    """LLaVA's expand2square: the image centred on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def prepare_image(image, image_processor, pad):
    image = image.convert("RGB")
    if pad:
        # LLaVA fills with the processor mean as int(x * 255): (122, 116, 104) for CLIP
        image = expand_to_square(image, tuple(int(x * 255) for x in image_processor.image_mean))
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class LoadedCheckpoint(NamedTuple):
    model: Any  # LlavaForConditionalGeneration
    tokenizer: Any
    image_processor_folder: str  # where the CLIP preprocessing config is
    pad: bool  # pad images to a square first (image_aspect_ratio "pad")
    generate_defaults: dict  # fixed generate() kwargs


def load_original_checkpoint(folder, config, vision_tower, settings, device):
    """An original LLaVA-1.5 folder, converted while loading, with its CLIP tower (--vision-tower, else
    mm_vision_tower)."""
    from transformers import LlamaTokenizer

    from convert.llava import load_original
    tower = fetch_folder(vision_tower or config["mm_vision_tower"], CHECKPOINT_FILES, "--vision-tower")
    model = load_original(folder, config, tower, settings.dtype, device, settings.attn_implementation)
    # the class the original loads; AutoTokenizer, misled by model_type "llava", builds a generic tokenizer
    # without sentencepiece's dummy prefix
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    # the original vocabulary has no image token: never generate it
    return LoadedCheckpoint(model, tokenizer, tower, config.get("image_aspect_ratio") == "pad",
                            {"suppress_tokens": [model.config.image_token_id]})


def load_hf_checkpoint(folder, vision_tower, settings, device):
    """A llava-hf folder, as it is."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    if vision_tower:
        raise UserError("--vision-tower is for original-format checkpoints; "
                        f"{folder} is a llava-hf checkpoint with its own vision tower")
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=settings.dtype, device_map=device, attn_implementation=settings.attn_implementation)
    # llava-hf's LLaVA-1.5 conversions were all trained with image_aspect_ratio "pad"
    return LoadedCheckpoint(model, AutoTokenizer.from_pretrained(folder), folder, True, {})


def load_checkpoint(settings, device):
    """--model in either format."""
    from convert.llava import is_original_format
    folder = fetch_folder(settings.model, CHECKPOINT_FILES)
    config = read_json(os.path.join(folder, "config.json"))
    if config is None:
        raise UserError(f"no config.json in {folder}")
    vision_tower = settings.options["vision_tower"]
    if is_original_format(config):
        return load_original_checkpoint(folder, config, vision_tower, settings, device)
    if "LlavaForConditionalGeneration" in config.get("architectures", []):
        return load_hf_checkpoint(folder, vision_tower, settings, device)
    raise UserError(f"{folder} is neither a llava-hf (LlavaForConditionalGeneration) nor an original "
                    "LLaVA-1.5 (mm_vision_tower in config.json) checkpoint")


class LlavaCaptioner(Captioner):
    name = "llava"
    default_model = "liuhaotian/llava-v1.5-13b"
    prompts = presets.LLAVA
    default_prompt = "default"
    # The original scripts sampled at temperature 0.2 (top_p None, one beam) with one image per call; 8 images
    # per call fit a 40 GB GPU with the 13B model in float16 (26 GB weights, ~0.6 GB of cache per image and
    # prompt; with several prompts, a batch that runs out of memory is split and retried).
    defaults = {"batch_size": 8, "temperature": 0.2}
    default_dtype = "float16"
    caption_flags = ("vision_tower",)
    refills_rows = True

    @staticmethod
    def add_arguments(parser):
        parser.epilog = (
            "--model takes a llava-hf checkpoint (LlavaForConditionalGeneration, e.g. llava-hf/llava-1.5-13b-hf) "
            "or an original LLaVA-1.5 one (LlavaLlamaForCausalLM with mm_* config keys, e.g. "
            "liuhaotian/llava-v1.5-13b, converted while loading; its CLIP tower comes from mm_vision_tower or "
            "--vision-tower). Every prompt becomes the user turn of LLaVA-1.5's llava_v1 conversation, after the "
            "image: '<system> USER: <image>\\n<prompt> ASSISTANT:'. A '<image>' tag at the start or end of a prompt "
            "is dropped; one inside it reads as the word 'image', so the default preset (the original scripts' "
            "'Describe the <image> in English in detail:') asks 'Describe the image in English in detail:'. Images "
            "are padded to a square with the CLIP mean colour before the CLIP preprocessing, as LLaVA-1.5 does. "
            "Decoding defaults to the original scripts' sampling at temperature 0.2; --temperature 0 is greedy.")
        parser.add_argument(
            "--vision-tower", default=None, metavar="DIR",
            help="original-format checkpoints only: the CLIP vision tower (folder or hub id) instead of the "
                 "one the checkpoint names in mm_vision_tower (openai/clip-vit-large-patch14-336 for LLaVA-1.5)")

    def __init__(self, settings, device):
        from transformers import CLIPImageProcessorPil

        import utils.generation.attention  # noqa: F401  (registers the sdpa_grouped attention implementation)
        model, self.tokenizer, processor_folder, pad, generate_defaults = load_checkpoint(settings, device)
        self.model = model.eval()
        self.device = device
        self.generation = settings.decoding.generate_kwargs(**generate_defaults)
        self.decode_rows = settings.decode_rows
        self.image_token_id = model.config.image_token_id
        vision = model.config.vision_config
        self.num_image_tokens = (vision.image_size // vision.patch_size) ** 2 + (
            model.config.vision_feature_select_strategy == "full")
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.prepare = functools.partial(prepare_image, image_processor=CLIPImageProcessorPil.from_pretrained(
            processor_folder), pad=pad)

    def prompt_ids(self, question):
        """The ids of the llava_v1 prompt as LLaVA's tokenizer_image_token makes them: BOS once, each side of
        the image tokenized on its own (so the text after the image starts with the dummy-prefix piece),
        the image placeholder expanded to the number of image features."""
        before, after = split_prompt(question)
        encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        return [self.tokenizer.bos_token_id, *encode(before), *[self.image_token_id] * self.num_image_tokens,
                *encode(after)]

    def image_features(self, pixel_values):
        """One block of image features (image tokens x hidden size) per image, with the feature layer and
        selection of the config, as LlavaForConditionalGeneration's forward computes them."""
        config = self.model.config
        return self.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output

    @inference_mode
    def generate(self, pixel_values, prompt_ids):
        """Greedy or sampled captions of (image, prompt) rows, image-major. prompt_ids[i]: the prompt ids of
        image i's rows. The vision tower runs once per image; with several prompts per image, the tokens they
        share (system text, image, the text before the question) are prefilled once
        (utils/generation/shared_prefix.py)."""
        from utils.generation import shared_prefix
        output = shared_prefix.generate(
            self.model, prompt_ids, self.image_features(pixel_values), self.image_token_id, self.pad_token_id,
            self.decode_rows, eos_token_id=self.tokenizer.eos_token_id, **self.generation)
        new_tokens = output.tolist()  # generate() from embeddings returns only the new tokens; one copy to the CPU
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Caption(text.strip(), stopped_at_limit(row, {self.tokenizer.eos_token_id}))
                for text, row in zip(texts, new_tokens)]

    def caption(self, images, prompts, inputs=None):
        ids = [self.prompt_ids(prompt) for prompt in prompts]
        # all (image, prompt) rows in one generate(): images x prompts sequences decode together
        return by_image(self.generate(stack_to_device(images, self.device), [ids] * len(images)), prompts)


if __name__ == "__main__":
    run(LlavaCaptioner)
