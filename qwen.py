"""Caption images with Qwen2-VL, Qwen2.5-VL or Qwen3-VL, exactly as their model cards run them, batched.

    bash generate.sh input.json qwen [--model Qwen/Qwen2-VL-7B-Instruct] [flags]

The checkpoint's model_type picks the model class (MODEL_CLASSES). The model card: the chat template with the
image before the text, `qwen_vl_utils.process_vision_info` to resize (with the processor's pixel limits and patch
size: 14, or Qwen3-VL's 16), the native processor and `generate` with the checkpoint's generation config. The only
differences: many images go through one `generate` call, left-padded, and the processor's image half (resize,
normalise, cut into patches) runs in the loop's worker processes; the main process repeats each image's
placeholder id once per image token, which is what the processor's tokenization of the expanded text gives. The
vision tower gets its per-batch layout made on the CPU, with transformers' own functions, instead of computing it
from the grids on the GPU: each image's patch count and rotary positions, Qwen2.5-VL's attention windows, Qwen3-VL's
position-embedding interpolation.
"""
import contextlib
import functools
import sys
from pathlib import Path
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
MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}


class PreparedImage(NamedTuple):
    pixel_values: "torch.Tensor"  # the processor's patches, already in the model's dtype (the vision tower's cast)
    grid_thw: "torch.Tensor"  # (1, 3): frames, rows and columns of patches
    tokens: int  # image placeholder tokens in the prompt
    vision_positions: "torch.Tensor"  # (patches, 2): the vision tower's rotary positions of the patches


class BatchInputs(NamedTuple):
    """A batch's inputs as CPU tensors: its text rows (input_ids, attention_mask, mm_token_type_ids), their
    position ids, the image grids, and the vision tower's layout beyond the rotary positions (vision_layout())."""
    text: dict
    position_ids: "torch.Tensor"
    grid_thw: "torch.Tensor"
    vision: dict


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


def model_type(folder):
    """The checkpoint's model_type, from its config.json; a one-line error for one this script does not run."""
    import json
    from utils.errors import UserError
    try:
        kind = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise UserError(f"{folder}/config.json: not a model config (JSON object)") from None
    if kind not in MODEL_CLASSES:
        raise UserError(f"{folder}: model_type {kind!r} is not one of qwen.py's: {', '.join(MODEL_CLASSES)}")
    return kind


def rotated_qkv(qkv, cos, sin, heads, rotary):
    """A vision attention's query, key and value from its qkv projection, `rotary` (the family's
    apply_rotary_pos_emb_vision) applied to query and key, as transformers' VisionAttention computes them. Compiled
    (VisionAttention), this is one fused kernel instead of a dozen elementwise ones over float32 copies."""
    import torch
    torch._check(cos.shape[0] == qkv.shape[0])  # one row per patch (the compile's example has sizes of its own)
    query, key, value = qkv.reshape(qkv.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    query, key = rotary(query, key, cos, sin)
    return query, key, value


def per_sequence_attention(attention, query, key, value, boundaries):
    """Attention within each image of (tokens, heads, dim) query, key and value, one SDPA call per image, as
    transformers' VisionAttention makes them."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    lengths = (boundaries[1:] - boundaries[:-1]).tolist()
    parts = zip(*(torch.split(tensor.transpose(0, 1)[None], lengths, dim=2) for tensor in (query, key, value)))
    return torch.cat([sdpa_attention_forward(attention, part_query, part_key, part_value, None, dropout=0.0,
                                             scaling=attention.scaling, is_causal=False)[0]
                      for part_query, part_key, part_value in parts], dim=1)


class VisionAttention:
    """Stands in for the forward of a vision block's attention (transformers' VisionAttention: qkv, the rotary
    embedding, attention within each image or window, proj) and computes the same, two parts faster:
    - query, key and value come from rotated_qkv, compiled once compile_prefill sets `compile_wait`
      (utils/generation/compiled_prefill.py);
    - Qwen2.5-VL's windows are attended in one SDPA call over all the batch's windows, padded to the longest
      (padded_attention), where transformers makes one call per 64-patch window. The windows' PaddedLayout comes
      with the batch's layout (vision_layout()). Whole images keep one call each: per image, SDPA's kernel is
      faster than the padded call (bench/RESULTS.md)."""

    def __init__(self, attention):
        self.attention = attention
        self.rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
        self.compile_wait = None

    def __call__(self, hidden_states, cu_seqlens, position_embeddings, padded_layouts=(), **kwargs):
        from utils.generation.attention import padded_attention
        from utils.generation.compiled_prefill import run_compiled
        attention = self.attention
        args = (attention.qkv(hidden_states), *position_embeddings, attention.num_heads, self.rotary)
        query, key, value = (rotated_qkv(*args) if self.compile_wait is None
                             else run_compiled(rotated_qkv, args, self.compile_wait))
        layout = next((layout for layout in padded_layouts if layout.boundaries is cu_seqlens), None)
        if layout is None:
            output = per_sequence_attention(attention, query, key, value, cu_seqlens)
        else:
            output = padded_attention(query, key, value, layout, attention.scaling)
        return attention.proj(output.reshape(hidden_states.shape[0], -1))


def replace_vision_attention(visual):
    for block in visual.blocks:
        block.attn.forward = VisionAttention(block.attn)


def vision_layout(visual, grid_thw):
    """The vision tower's layout for a batch's grids beyond the rotary positions, made on the CPU with transformers'
    own functions, as its forward would make it: each image's patch boundaries, Qwen2.5-VL's windows (the order
    of the merged tokens, the windows' boundaries), Qwen3-VL's interpolation of its learned position embeddings;
    and for VisionAttention the PaddedLayout of Qwen2.5-VL's windows. From the grids on the GPU, each
    vision block reads the boundaries back (a wait for the GPU), then launches one attention call per image or
    window while the GPU idles (bench/RESULTS.md)."""
    from transformers import vision_utils

    from utils.generation.attention import PaddedLayout

    def longest(boundaries):
        return int((boundaries[1:] - boundaries[:-1]).max())
    cu_seqlens = vision_utils.get_vision_cu_seqlens(grid_thw)
    layout = {"cu_seqlens": cu_seqlens, "max_seqlen": longest(cu_seqlens)}
    config = visual.config
    if hasattr(config, "fullatt_block_indexes"):  # Qwen2.5-VL
        window_index, cu_window_seqlens = vision_utils.get_vision_window_index(
            grid_thw, config.spatial_merge_size, config.window_size, config.patch_size)
        layout.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens,
                      max_window_seqlen=longest(cu_window_seqlens))
    if hasattr(config, "num_position_embeddings"):  # Qwen3-VL
        layout["interp_indices"], layout["interp_weights"] = vision_utils.get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=config.spatial_merge_size)
    if isinstance(visual.blocks[0].attn.forward, VisionAttention) and "cu_window_seqlens" in layout:
        layout["padded_layouts"] = (PaddedLayout.of(layout["cu_window_seqlens"]),)
    return layout


def layout_on_device(vision, device, boundaries_on_gpu):
    """vision_layout()'s tensors on the GPU, but for the boundaries, which split the attention on the CPU except in
    flash-attn's varlen call (`boundaries_on_gpu`)."""
    import torch
    layout = {name: to_device_async(value, device) if isinstance(value, torch.Tensor) and (
        boundaries_on_gpu or not name.endswith("seqlens")) else value for name, value in vision.items()}
    if "padded_layouts" in layout:
        layout["padded_layouts"] = tuple(padded.to(device) for padded in layout["padded_layouts"])
    return layout


@contextlib.contextmanager
def given_layout(visual, layout):
    """The vision tower's calls in this context take the batch's layout made beforehand, as transformers'
    vision_utils lets a caller precompute it."""
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

    @classmethod
    def check_options(cls, model, options):
        if (Path(model) / "config.json").is_file():  # a hub id's config is read once it is downloaded
            model_type(model)

    def __init__(self, settings, device):
        import transformers
        from transformers import AutoProcessor

        import utils.generation.attention  # noqa: F401  (registers the sdpa_grouped attention implementation)
        folder = fetch_folder(settings.model, CHECKPOINT_FILES)
        model_class = getattr(transformers, MODEL_CLASSES[model_type(folder)])
        self.processor = AutoProcessor.from_pretrained(folder)
        image_processor = self.processor.image_processor
        # qwen_vl_utils and the processor must use the same limits, or images are resized twice.
        min_pixels = settings.options["min_pixels"] or image_processor.size["shortest_edge"]
        max_pixels = settings.options["max_pixels"] or image_processor.size["longest_edge"]
        image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.prepare = functools.partial(prepare_image, min_pixels=min_pixels, max_pixels=max_pixels,
                                         image_processor=image_processor, dtype=settings.dtype)
        self.model = model_class.from_pretrained(
            folder, dtype=settings.dtype, attn_implementation=settings.attn_implementation).to(device).eval()
        # flash-attn's varlen call reads the boundaries on the GPU; the others find them on the CPU; SDPA's
        # vision attention runs in VisionAttention (eager stays transformers' reference)
        self.boundaries_on_gpu = settings.attn_implementation == "flash_attention_2"
        if settings.attn_implementation in ("sdpa_grouped", "sdpa"):
            replace_vision_attention(self.model.model.visual)
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
        text = self.text_inputs(images, prompts)
        grid_thw = torch.cat([image.grid_thw for image in images for _ in prompts])
        return BatchInputs(text, self.position_ids(text, grid_thw), grid_thw,
                           vision_layout(self.model.model.visual, grid_thw))

    def caption(self, images, prompts, inputs=None):
        device = self.model.device
        text, position_ids, grid_thw, vision = self.cpu_inputs(images, prompts) if inputs is None else inputs
        model_inputs = {name: to_device_async(tensor, device) for name, tensor in text.items()}
        model_inputs["position_ids"] = to_device_async(position_ids, device)
        model_inputs["pixel_values"] = to_device([image.pixel_values for image in images for _ in prompts], device)
        model_inputs["image_grid_thw"] = to_device_async(grid_thw, device)
        layout = layout_on_device(vision, device, self.boundaries_on_gpu)
        layout["position_ids"] = to_device([image.vision_positions for image in images for _ in prompts], device)
        with given_layout(self.model.model.visual, layout):
            output = self.model.generate(**model_inputs, **self.generation)
        new_tokens = output[:, model_inputs["input_ids"].shape[1]:].tolist()  # one copy to the CPU
        answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        captions = [Caption(text, stopped_at_limit(row, self.end_token_ids))
                    for text, row in zip(answers, new_tokens)]
        return by_image(captions, prompts)


if __name__ == "__main__":
    run(QwenCaptioner)
