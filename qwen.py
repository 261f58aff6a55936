"""Caption images with Qwen2-VL, exactly as its model card runs it, batched.

    bash generate.sh input.json qwen [--model Qwen/Qwen2-VL-7B-Instruct] [flags]

The model card: the chat template with the image before the text, `qwen_vl_utils.process_vision_info`
to resize, the native processor and `Qwen2VLForConditionalGeneration.generate` with the checkpoint's
generation config. The only differences: many images go through one `generate` call, left-padded, and
the processor's image half (resize, normalise, cut into patches) runs in the loop's worker processes;
the main process repeats each image's placeholder id once per image token, which is what the processor's
tokenization of the expanded text gives. The vision tower gets its per-batch layout (each image's patch
count and rotary positions) made on the CPU, with transformers' own functions, instead of computing it
from the grids on the GPU.
"""
import contextlib
import functools
from typing import TYPE_CHECKING, NamedTuple

from utils import prompts as presets
from utils.caption_loop import run
from utils.captioner import Caption, Captioner, by_image, stopped_at_limit
from utils.checkpoints import fetch_folder
from utils.generation.tensors import left_padded, mask_positions, to_device, to_device_async

# torch, transformers and qwen_vl_utils are imported where they are used: --help and mistakes answer at once.
if TYPE_CHECKING:
    import torch

# what a hub id is downloaded with: configs (model, generation, processor, chat template), tokenizer and weights
CHECKPOINT_FILES = ["*.json", "*.txt", "*.jinja", "*.safetensors"]


class PreparedImage(NamedTuple):
    pixel_values: "torch.Tensor"  # the processor's patches, already in the model's dtype (the vision tower's cast)
    grid_thw: "torch.Tensor"  # (1, 3): frames, rows and columns of patches
    tokens: int  # image placeholder tokens in the prompt
    vision_positions: "torch.Tensor"  # (patches, 2): the vision tower's rotary positions of the patches


class BatchInputs(NamedTuple):
    """A batch's inputs as CPU tensors: its text rows (input_ids, attention_mask, mm_token_type_ids), their
    position ids, and the image grids with the vision tower's sequence boundaries."""
    text: dict
    position_ids: "torch.Tensor"
    grid_thw: "torch.Tensor"
    vision_cu_seqlens: "torch.Tensor"


def prepare_image(image, min_pixels, max_pixels, image_processor, dtype):
    """qwen_vl_utils' resize (RGBA onto white, a multiple of 2 patches within the pixel budget), then the
    processor's image half, as the model card's processor call runs it, and the patches' rotary positions as
    the vision tower computes them."""
    from qwen_vl_utils import fetch_image
    from transformers.vision_utils import get_vision_position_ids
    resized = fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels},
                          image_patch_size=image_processor.patch_size)
    processed = image_processor(images=[resized], return_tensors="pt")
    grid = processed["image_grid_thw"]
    return PreparedImage(processed["pixel_values"].to(dtype), grid, int(grid.prod()) // image_processor.merge_size ** 2,
                         get_vision_position_ids(grid, image_processor.merge_size))


@contextlib.contextmanager
def vision_layout(visual, cu_seqlens, positions):
    """The vision tower's calls in this context take the batch's layout made beforehand, as transformers'
    vision_utils lets a caller precompute it: each image's patch boundaries (cu_seqlens) on the CPU and the
    patches' rotary positions. From the grids on the GPU, each vision block reads the boundaries back (a wait
    for the GPU), then launches one attention call per image while the GPU idles (bench/RESULTS.md)."""
    layout = {"cu_seqlens": cu_seqlens, "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
              "position_ids": positions}
    hook = visual.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, **layout}),
                                            with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


class QwenCaptioner(Captioner):
    name = "qwen"
    default_model = "Qwen/Qwen2-VL-7B-Instruct"
    prompts = presets.QWEN
    default_prompt = "default"
    defaults = {"batch_size": 16}
    default_dtype = "bfloat16"
    caption_flags = ("min_pixels", "max_pixels")
    # generate() appends to it at every step; with the 3D positions generate() passes, decoding never reads it
    unread_in_decode = ("mm_token_type_ids",)

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--min-pixels", type=int, default=None,
                            help="smallest image area after resizing (default: the checkpoint's processor setting)")
        parser.add_argument("--max-pixels", type=int, default=None,
                            help="largest image area after resizing; lower it to save memory and time "
                            "(default: the checkpoint's processor setting)")

    def __init__(self, settings, device):
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        import utils.generation.attention  # noqa: F401  (registers the sdpa_grouped attention implementation)
        folder = fetch_folder(settings.model, CHECKPOINT_FILES)
        self.processor = AutoProcessor.from_pretrained(folder)
        image_processor = self.processor.image_processor
        # qwen_vl_utils and the processor must use the same limits, or images are resized twice.
        min_pixels = settings.options["min_pixels"] or image_processor.size["shortest_edge"]
        max_pixels = settings.options["max_pixels"] or image_processor.size["longest_edge"]
        image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.prepare = functools.partial(prepare_image, min_pixels=min_pixels, max_pixels=max_pixels,
                                         image_processor=image_processor, dtype=settings.dtype)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            folder, dtype=settings.dtype, attn_implementation=settings.attn_implementation).to(device).eval()
        # flash-attn's varlen call reads the boundaries on the GPU; the other implementations split on the CPU
        self.boundaries_on_gpu = settings.attn_implementation == "flash_attention_2"
        self.prompt_ids = functools.lru_cache(maxsize=64)(self.prompt_ids)  # the same few prompts in every batch
        self.generation = settings.decoding.generate_kwargs()
        end = self.model.generation_config.eos_token_id
        self.end_token_ids = set(end if isinstance(end, list) else [end])

    def chat_text(self, prompt):
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    def cost(self, image):
        return image.tokens

    def prompt_ids(self, prompt):
        """Token ids of the chat text, its image placeholder once: the processor tokenizes the text with the
        placeholder repeated once per image token, which gives these ids with the placeholder id repeated (a
        special token: no merge crosses it), so each image's ids are made by repeating it, not by re-tokenizing."""
        return self.processor.tokenizer(self.chat_text(prompt))["input_ids"]

    def text_inputs(self, images, prompts):
        """input_ids, attention_mask and mm_token_type_ids of every (image, prompt) row, left-padded, as the
        processor's text half makes them."""
        image_token = self.model.config.image_token_id
        prompt_ids = [self.prompt_ids(prompt) for prompt in prompts]  # the template and tokenizer once a prompt
        rows = []
        for image in images:
            for ids in prompt_ids:
                at = ids.index(image_token)
                rows.append(ids[:at] + [image_token] * image.tokens + ids[at + 1:])
        input_ids, attention_mask = left_padded(rows, self.processor.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "mm_token_type_ids": (input_ids == image_token).int()}

    def position_ids(self, text, grid_thw):
        """The position ids generate() makes for Qwen2-VL (its _prepare_position_ids_for_generation: the text
        positions from the mask, then get_rope_index's three rows of image-aware positions), computed on the CPU:
        get_rope_index loops over the rows, and on the GPU each row waits for the GPU several times."""
        import torch
        mask = text["attention_mask"]
        image_positions, _ = self.model.model.get_rope_index(text["input_ids"], text["mm_token_type_ids"], grid_thw,
                                                             attention_mask=mask)
        return torch.cat([mask_positions(mask)[None], image_positions])

    def cpu_inputs(self, images, prompts):
        """The batch's work on the CPU, apart from the GPU's: the loop runs it on its batcher thread while the
        GPU captions the batch before (utils/batcher.py)."""
        import torch
        from transformers.vision_utils import get_vision_cu_seqlens
        text = self.text_inputs(images, prompts)
        grid_thw = torch.cat([image.grid_thw for image in images for _ in prompts])
        return BatchInputs(text, self.position_ids(text, grid_thw), grid_thw, get_vision_cu_seqlens(grid_thw))

    def caption(self, images, prompts, inputs=None):
        device = self.model.device
        text, position_ids, grid_thw, cu_seqlens = self.cpu_inputs(images, prompts) if inputs is None else inputs
        model_inputs = {name: to_device_async(tensor, device) for name, tensor in text.items()}
        model_inputs["position_ids"] = to_device_async(position_ids, device)
        model_inputs["pixel_values"] = to_device([image.pixel_values for image in images for _ in prompts], device)
        model_inputs["image_grid_thw"] = to_device_async(grid_thw, device)
        positions = to_device([image.vision_positions for image in images for _ in prompts], device)
        if self.boundaries_on_gpu:
            cu_seqlens = cu_seqlens.to(device)
        with vision_layout(self.model.model.visual, cu_seqlens, positions):
            output = self.model.generate(**model_inputs, **self.generation)
        new_tokens = output[:, model_inputs["input_ids"].shape[1]:].tolist()  # one copy to the CPU
        answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        captions = [Caption(text, stopped_at_limit(row, self.end_token_ids))
                    for text, row in zip(answers, new_tokens)]
        return by_image(captions, prompts)


if __name__ == "__main__":
    run(QwenCaptioner)
