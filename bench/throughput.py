"""GPU throughput of the captioning scripts against the seed's loop, on real-size random-weight models. The seed:
the original scripts, Holistic-CLIP's synthetic_caption scripts, whose loop the "seed" rows run.

    python -m bench.throughput --models qwen --json bench/out/throughput.json
    python -m bench.throughput --smoke [--lengths realistic] [--profile /tmp/trace]   # CPU check of the benchmark

For each model: the real architecture (its published config) is built with random weights directly on
the GPU, the tokenizer and processor files come from the tests' tiny checkpoints (token ids do not
change the work), and decoding is fixed at --new-tokens new tokens (min = max) so every variant does
the same work. Images: a mix of typical web-image sizes written as JPEG files.

Rows:
  seed bN   the seed's loop: images opened and preprocessed synchronously in the loop, one generate()
            per batch of N in input order.
  ours bN   the real script's loop (utils/caption_loop.py): worker processes, batches sorted by length,
            out-of-memory backoff, sdpa_grouped attention, lines written to disk.
  ours bN xK prompts   the same with K prompts in one pass (InternVL2's five merge prompts); its
            images/s counts images, each with K captions.
  ours bN, vision per sequence   (--unpacked-vision, Qwen models) the same with the vision tower's attention
            as transformers runs it: one call per image or window, the rotary embedding eager.
Columns: images/s, prefill and decode time of one batch, peak GPU memory, model FLOPs utilisation (model FLOPs
per caption x images/s / measured bf16 matmul peak), and the share of the speed of light: the time the row's work
takes at least, the prefill's model FLOPs at that peak plus what decode steps must read (the weights once per
step, an image's prompt KV once per step for all its captions, each caption's own tokens) at the measured memory
bandwidth, against the row's wall time; with the prefill's share of that time (which phase bounds the model).
Our rows also report the seconds inside caption() and those the batcher thread waited on the image workers.

Before the rows, the split: prefill and decode step time of one sorted batch, and for Qwen2-VL and MiniGPT-4
the time of each part of the prefill (vision tower, Q-Former, language model, ...; GPU synchronised around
each) with the rest of caption() outside them.

--lengths realistic: captions end at lengths drawn per (image, prompt) instead (bench/caption_lengths.py);
each row reports the share of decode steps spent on rows that had already ended, and what compacting the
batch would save at most. --profile DIR: an extra row of ours whose steady-state batches are profiled as a
timeline (bench/timeline.py, ranges from bench/instrument.py). --tiny runs the same code on the tests' tiny
checkpoints on the CPU; --smoke does so with a few images for every model.
"""
import argparse
import contextlib
import functools
import importlib
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.profiler import record_function

from bench.caption_lengths import CaptionLengths
from bench.instrument import PREFIX, loader_wait, marked_regions, patched, timed
from bench.timeline import BatchProfile
from utils.caption_loop import caption_part, load_captioner
from utils.command_line import build_parser
from utils.generation import refill
from utils.generation.compiled_prefill import eager_forwards
from utils.generation.cuda_graphs import eager_decoding
from utils.images import open_image
from utils.settings import ProcessPlace, resolve_settings


# Typical CC3M/CC12M image sizes (width, height); Qwen2-VL turns them into ~100 to ~900 image tokens.
IMAGE_SIZES = [(500, 375), (640, 480), (800, 600), (1024, 576), (400, 600), (300, 300), (960, 640), (640, 427)]

QWEN2_VL_7B = dict(
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
)


QWEN2_5_VL_7B = dict(
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
    text_config=dict(QWEN2_VL_7B["text_config"], max_position_embeddings=128000),
)


def make_images(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)  # smooth, JPEG-typical content
        names.append(f"img{i:05d}.jpg")
        image.save(folder / names[-1], quality=90)
    with open(folder / "input.json", "w") as f:
        json.dump([{"image": name} for name in names], f)
    return names


def measured_peak_tflops(device):
    """bf16 matmul TFLOP/s on this GPU: the denominator of model FLOPs utilisation."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12


def random_weights_loader(model_class, device, dtype):
    """from_pretrained replacement: the architecture of the folder's config, random weights, built on the GPU."""
    built = {}

    def from_pretrained(path, **kwargs):
        if path not in built:
            config = model_class.config_class.from_pretrained(path)
            config._attn_implementation = kwargs.get("attn_implementation", "sdpa")
            with torch.device(device):
                built[path] = model_class._from_config(config, dtype=dtype).eval()
        built[path].set_attn_implementation(kwargs.get("attn_implementation", "sdpa"))
        return built[path]

    return from_pretrained


def script_settings(captioner_class, flags):
    """The Settings a model script resolves from its command line `flags`, in a run of one process."""
    parser, own_flags = build_parser(captioner_class)
    return resolve_settings(captioner_class, parser.parse_args(flags), own_flags, ProcessPlace(0, 1, 0))


def unknown_ids_as_unk(tokenizer_class, size):
    """Random weights emit ids past a tiny tokenizer's vocabulary: its decode reads those as id 0 (<unk>)."""
    decode = tokenizer_class.decode
    tokenizer_class.decode = lambda self, ids, **kwargs: decode(self, [i if i < size else 0 for i in ids], **kwargs)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- Qwen2-VL

def qwen_checkpoint(folder, tiny, model_type="qwen2_vl", architecture=QWEN2_VL_7B):
    """The tests' tiny checkpoint of `model_type`; not tiny, given the real `architecture` (Qwen2-VL-7B's by
    default) and the model card's pixel limits."""
    from tests.qwen_checkpoint import FAMILIES, make_checkpoint
    config_class = FAMILIES[model_type][0]
    path = make_checkpoint(folder / model_type, model_type=model_type)
    if not tiny:  # the real architecture and pixel limits; weights are made on the GPU, not read
        config = config_class.from_pretrained(path)
        real = config_class(**architecture, image_token_id=config.image_token_id,
                             video_token_id=config.video_token_id, vision_start_token_id=config.vision_start_token_id,
                             vision_end_token_id=config.vision_end_token_id)
        real.text_config.eos_token_id = config.text_config.eos_token_id
        real.text_config.pad_token_id = config.text_config.pad_token_id
        real.save_pretrained(path)
        processor_config = json.loads((path / "processor_config.json").read_text())
        processor_config["image_processor"]["size"] = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
        (path / "processor_config.json").write_text(json.dumps(processor_config))
    return path


def transformers_vision_attention(visual):
    """Undo qwen.replace_vision_attention: the vision tower's attention as transformers runs it."""
    for block in visual.blocks:
        block.attn.__dict__.pop("forward", None)


def qwen_sizes(captioner, prepared):
    """(prompt tokens, vision-tower patches) of one prepared image."""
    return prepared.tokens + 30, int(prepared.grid_thw.prod())


# ----------------------------------------------------------------------------------------------- InternVL2

INTERNVL2_8B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           qkv_bias=True, qk_normalization=False, norm_type="layer_norm")
INTERNVL2_8B_LLM = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        num_hidden_layers=32, vocab_size=92553, max_position_embeddings=32768, rope_theta=1000000,
                        rope_scaling={"type": "dynamic", "factor": 2.0})


# InternVL3-8B: InternViT-300M-448px-V2_5 (InternVL2's sizes) + Qwen2.5-7B-Instruct, the internvl2_5 template
INTERNVL3_8B_LLM = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                        num_hidden_layers=28, vocab_size=151674, max_position_embeddings=32768, rope_theta=1000000.0)


def internvl_checkpoint(variant="internlm2", llm=INTERNVL2_8B_LLM):
    """A native InternVL folder: the tests' tiny original checkpoint of `variant` converted, then (not tiny) given
    the real architecture (InternViT-300M + `llm`; by default InternVL2-8B's InternLM2.5-7B)."""
    def checkpoint(folder, tiny):
        import internvl
        from convert.internvl import convert_checkpoint, native_config
        from tests.internvl_checkpoint import build_checkpoint
        original = Path(build_checkpoint(str(folder / f"internvl-{variant}-original"), variant))
        image_token_id = internvl.load_tokenizer(str(original)).convert_tokens_to_ids(internvl.IMG_CONTEXT)
        native = Path(convert_checkpoint(str(original), str(folder / f"internvl-{variant}"), image_token_id))
        if not tiny:
            tokenizer = internvl.load_tokenizer(str(native))
            if isinstance(tokenizer, internvl.InternLM2Tokenizer):
                unknown_ids_as_unk(internvl.InternLM2Tokenizer, tokenizer.sp.get_piece_size())
            config = json.loads((original / "config.json").read_text())
            config["vision_config"].update(INTERNVL2_8B_VISION)
            config["llm_config"].update(llm)
            native_config(config).save_pretrained(native)
        return native
    return checkpoint


def internvl_sizes(captioner, prepared):
    tiles = len(prepared)
    return tiles * captioner.model.config.image_seq_length + 60, tiles * (448 // 14) ** 2


def language_model(model):
    """The module that generates: the model itself, or (MiniGPT-4) its language_model."""
    from transformers import GenerationMixin
    return model if isinstance(model, GenerationMixin) else model.language_model


# ----------------------------------------------------------------------------------------------- LLaVA-1.5

CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
VICUNA = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=128),
          "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, head_dim=128)}


def llava_checkpoint(size):
    """A llava-hf folder: the tests' tiny one, then (not tiny) given LLaVA-1.5-7B/13B's architecture (CLIP ViT-L/14
    at 336 px, Vicuna v1.5 with llava-hf's 32064-row vocabulary)."""
    def checkpoint(folder, tiny):
        from tests.llava_checkpoint import build_checkpoints
        path = build_checkpoints(folder / f"llava-{size}").hf
        if not tiny:
            config = json.loads((path / "config.json").read_text())
            config["vision_config"].update(CLIP_VIT_L_336)
            config["text_config"].update(VICUNA[size], vocab_size=32064, max_position_embeddings=4096)
            (path / "config.json").write_text(json.dumps(config))
        return path
    return checkpoint


def llava_sizes(captioner, prepared):
    return captioner.num_image_tokens + 40, captioner.num_image_tokens + 1


# ----------------------------------------------------------------------------------------------- MiniGPT-4

def minigpt4_checkpoint(folder, tiny):
    """The tests' tiny original files (tokenizer, eval config); not tiny, the model is built with MiniGPT-4's
    real architecture instead of read: EVA ViT-g (39 of 40 blocks), the BLIP-2 Q-Former, Vicuna-7B v0."""
    import minigpt4
    from tests.minigpt4_checkpoint import build
    root = build(str(folder / "minigpt4"))
    os.environ["TORCH_HOME"] = f"{root}/torch_home"
    if not tiny:
        minigpt4.load_model = minigpt4_real_size
        unknown_ids_as_unk(minigpt4.SlowLlamaTokenizer,
                           minigpt4.SlowLlamaTokenizer(f"{root}/vicuna/tokenizer.model").sp.get_piece_size())
    return f"{root}/repo/eval_configs/minigpt4_eval.yaml"


def minigpt4_real_size(files, dtype, device, attn_implementation):
    import minigpt4
    from transformers import Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig, LlamaForCausalLM
    vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                               image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    qformer = Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                 cross_attention_frequency=2, encoder_hidden_size=1408, layer_norm_eps=1e-12)
    llama = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    for config in (vision, qformer, llama):
        config._attn_implementation = attn_implementation
    with torch.device(device):
        model = minigpt4.MiniGPT4(vision, qformer, 32, LlamaForCausalLM._from_config(llama, dtype=dtype))
    return model.to(dtype).eval()


def minigpt4_sizes(captioner, prepared):
    return 32 + 40, (224 // 14) ** 2 + 1


def measured_bandwidth_gbs(device):
    """Memory GB/s on this GPU, a copy of 4 GiB counted as its reads and writes: the denominator of decode's speed
    of light."""
    if device.type != "cuda":
        return float("nan")
    source = torch.empty(2 ** 31, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del source, target
    return 10 * 2 * 2 ** 32 / seconds / 1e9


class ModelShape:
    """What the speed of light and the model FLOPs count: parameters of the vision part and of the language model
    (without its input embeddings, which a step reads one row of), and its KV cache bytes per token."""

    def __init__(self, captioner, vision_names):
        model = captioner.model
        self.vision = sum(p.numel() for n, p in model.named_parameters() if any(v in n for v in vision_names))
        embeddings = language_model(model).get_input_embeddings().weight
        self.text = sum(p.numel() for p in model.parameters()) - self.vision - embeddings.numel()
        config = language_model(model).config.get_text_config()
        self.layers, self.hidden = config.num_hidden_layers, config.hidden_size
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.dtype_bytes = embeddings.element_size()
        self.kv_bytes_per_token = 2 * self.layers * kv_heads * head_dim * self.dtype_bytes

    def prefill_flops(self, prompt, patches):
        """2 x parameters x tokens for the language model and the vision tower, plus attention (4 x layers x hidden
        size x context, per token)."""
        return 2 * self.text * prompt + 2 * self.vision * patches + 4 * self.layers * self.hidden * prompt * prompt / 2

    def decode_flops(self, prompt, new_tokens, prompts):
        context = prompts * new_tokens * (prompt + new_tokens / 2)
        return 2 * self.text * prompts * new_tokens + 4 * self.layers * self.hidden * context

    def decode_bytes(self, prompt, new_tokens, prompts, rows_per_step):
        """What an image's decode steps must read at least: the weights once per step for all its rows, so an
        image's share; the KV cache of its prompt once per step (its prompts share it) and each caption's own."""
        weights = self.text * self.dtype_bytes * prompts * new_tokens / rows_per_step
        kv = self.kv_bytes_per_token * (new_tokens * prompt + prompts * new_tokens * new_tokens / 2)
        return weights + kv


def model_flops(shape, captioner, prepared_images, sizes, new_tokens, prompts=1):
    """Model FLOPs per image with `prompts` captions (ModelShape's count). The work a task needs: the image and its
    prompt are counted once, then each caption's new tokens (the questions of further prompts, 10 to 30 tokens
    each, are left out), so rows that recompute the prompt per caption do not score higher."""
    total = 0
    for prepared in prepared_images:
        prompt, patches = sizes(captioner, prepared)
        total += shape.prefill_flops(prompt, patches) + shape.decode_flops(prompt, new_tokens, prompts)
    return total / len(prepared_images)


def speed_of_light(shape, captioner, prepared_images, sizes, new_tokens, prompts, rows_per_step, peak_tflops,
                   bandwidth_gbs):
    """(prefill s, decode s) per image at the speed of light: the prefill's model FLOPs at the matmul peak; decode
    at the memory bandwidth for the bytes its steps must read (ModelShape.decode_bytes), or at the peak for its
    FLOPs where those take longer."""
    prefill = decode = 0.0
    for prepared in prepared_images:
        prompt, patches = sizes(captioner, prepared)
        prefill += shape.prefill_flops(prompt, patches) / (peak_tflops * 1e12)
        decode += max(shape.decode_bytes(prompt, new_tokens, prompts, rows_per_step) / (bandwidth_gbs * 1e9),
                      shape.decode_flops(prompt, new_tokens, prompts) / (peak_tflops * 1e12))
    return prefill / len(prepared_images), decode / len(prepared_images)


def set_attention(model, implementation):
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and module.config._attn_implementation != implementation:
            module.set_attn_implementation(implementation)


def seed_loop(captioner, paths, batch_size, prompt_keys):
    """The seed's loop: each image opened and preprocessed in the loop itself, one generate() per batch, in
    input order, one prompt per pass over the images."""
    for key in prompt_keys:
        prompt = captioner.prompts[key]
        for start in range(0, len(paths), batch_size):
            captioner.caption([captioner.prepare(open_image(p)) for p in paths[start:start + batch_size]], [prompt])


VISION_TOWER_AND_PROJECTOR = {"vision tower": "model.vision_tower", "projector": "model.multi_modal_projector"}
QWEN = dict(script="qwen", captioner="QwenCaptioner", sizes=qwen_sizes, vision_names=("visual",), seed_batch=3,
            prefill_parts=("model.visual", "model.get_rope_index", "model.language_model", "lm_head"),
            parts={"vision tower": "model.visual"})
INTERNVL = dict(script="internvl", captioner="InternVLCaptioner", model_class="InternVLForConditionalGeneration",
                sizes=internvl_sizes, vision_names=("vision_tower", "multi_modal_projector"), seed_batch=20,
                multi_prompts="detail,noun,background,main,style", parts=VISION_TOWER_AND_PROJECTOR)
MODELS = {
    "qwen": dict(QWEN, model_class="Qwen2VLForConditionalGeneration", checkpoint=qwen_checkpoint),
    "qwen2.5": dict(QWEN, model_class="Qwen2_5_VLForConditionalGeneration",
                    checkpoint=functools.partial(qwen_checkpoint, model_type="qwen2_5_vl", architecture=QWEN2_5_VL_7B)),
    "internvl": dict(INTERNVL, checkpoint=internvl_checkpoint()),
    "internvl3": dict(INTERNVL, checkpoint=internvl_checkpoint("qwen2_5", INTERNVL3_8B_LLM)),
    "llava-7b": dict(script="llava", captioner="LlavaCaptioner", model_class="LlavaForConditionalGeneration",
                     checkpoint=llava_checkpoint("7b"), sizes=llava_sizes,
                     vision_names=("vision_tower", "multi_modal_projector"), seed_batch=8,
                     parts=VISION_TOWER_AND_PROJECTOR),
    "llava-13b": dict(script="llava", captioner="LlavaCaptioner", model_class="LlavaForConditionalGeneration",
                      checkpoint=llava_checkpoint("13b"), sizes=llava_sizes,
                      vision_names=("vision_tower", "multi_modal_projector"), seed_batch=8,
                      parts=VISION_TOWER_AND_PROJECTOR),
    "minigpt4": dict(script="minigpt4", captioner="MiniGPT4Captioner", model_class="LlamaForCausalLM",
                     checkpoint=minigpt4_checkpoint, sizes=minigpt4_sizes, checkpoint_flag="--cfg-path",
                     vision_names=("vision_model", "ln_vision", "qformer", "query_tokens", "llama_proj"), seed_batch=3,
                     prefill_parts=("vision_model", "ln_vision", "qformer", "llama_proj", "language_model"),
                     parts={"vision tower (EVA ViT-g)": "vision_model", "ln_vision": "ln_vision", "Q-Former": "qformer",
                            "llama_proj": "llama_proj"}),
}


def caption_exactly(captioner, images, tokens):
    """One caption() of the default prompt with exactly `tokens` new tokens; the generation settings are restored."""
    saved = dict(captioner.generation)
    captioner.generation.update(max_new_tokens=tokens, min_new_tokens=tokens)
    try:
        captioner.caption(images, [captioner.prompts[captioner.default_prompt]])
    finally:
        captioner.generation = saved


def prefill_and_decode(captioner, images, new_tokens, device):
    """Seconds of prefill (generate with one new token) and per decode step, for one batch of prepared images."""
    timings = []
    for tokens in (1, new_tokens):
        sync(device)
        start = time.perf_counter()
        caption_exactly(captioner, images, tokens)
        sync(device)
        timings.append(time.perf_counter() - start)
    return timings[0], (timings[1] - timings[0]) / (new_tokens - 1)


def prefill_parts(captioner, images, parts, device):
    """Seconds spent in each named part of the model (a submodule or a method, dotted from the model) during one
    prefill (generate with one new token), the GPU synchronised around each part; outside_parts_s is the rest of
    caption() (its inputs, the generate() loop, the text)."""
    seconds = dict.fromkeys(parts, 0.0)
    with contextlib.ExitStack() as stack:
        for name in parts:
            owner_name, _, attribute = name.rpartition(".")
            owner = captioner.model.get_submodule(owner_name) if owner_name else captioner.model
            if isinstance(getattr(owner, attribute), torch.nn.Module):
                owner, attribute = getattr(owner, attribute), "forward"
            stack.enter_context(patched(owner, attribute, timed(seconds, name, functools.partial(sync, device))))
        sync(device)
        start = time.perf_counter()
        caption_exactly(captioner, images, 1)
        sync(device)
        total = time.perf_counter() - start
    return dict(total_s=round(total, 3), **{name: round(s, 3) for name, s in seconds.items()},
                outside_parts_s=round(total - sum(seconds.values()), 3))


def profile_decode(captioner, images, new_tokens, device):
    """GPU kernel time of decoding alone: a profile of generate() with `new_tokens` tokens minus one with 1."""
    from torch.profiler import ProfilerActivity, profile
    totals = []
    for tokens in (1, new_tokens):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            caption_exactly(captioner, images, tokens)
            sync(device)
        totals.append({e.key: e.self_device_time_total for e in prof.key_averages()})
    steps = new_tokens - 1
    decode = sorted(((totals[1][k] - totals[0].get(k, 0)) / steps / 1000, k) for k in totals[1])[::-1]
    print(f"decode, batch {len(images)}: GPU busy {sum(ms for ms, _ in decode):.2f} ms per step; "
          "top kernels (ms/step):")
    for ms, key in decode[:15]:
        print(f"  {ms:8.3f}  {key[:110]}")
    return sum(ms for ms, _ in decode)


def marked_generate(lengths):
    """wrap for the generating class's generate: each call is the range "bench: generate"; with realistic lengths
    (`lengths` not None), a call made by a planned caption() gets its rows' EndAtLength."""
    def wrap(generate):
        @functools.wraps(generate)
        def bench_generate(module, *args, **kwargs):
            with record_function(PREFIX + "generate"):
                if lengths is None or not lengths.planned:
                    return generate(module, *args, **kwargs)
                return lengths.generate(generate, module, *args, **kwargs)
        return bench_generate
    return wrap


def refill_at_lengths(lengths, steps):
    """wrap for utils/generation/refill.py's generate: a call made by a planned caption() gets its rows' lengths
    (steps: the Counter that counted_steps fills)."""
    def wrap(generate):
        @functools.wraps(generate)
        def bench_refill(*args, **kwargs):
            if not lengths.planned:
                return generate(*args, **kwargs)
            return lengths.refill(generate, steps, *args, **kwargs)
        return bench_refill
    return wrap


def counted_steps(steps):
    """wrap for utils/generation/refill.py's Slots.step: counts the decode steps and the slot-steps."""
    def wrap(step):
        @functools.wraps(step)
        def counted_step(slots):
            steps.update(steps=1, slot_steps=slots.size)
            return step(slots)
        return counted_step
    return wrap


def planned_lengths(lengths):
    """wrap for caption(): draws the lengths of the call's rows before it runs."""
    def wrap(caption):
        @functools.wraps(caption)
        def caption_at_lengths(captioner, images, prompts, inputs=None):
            lengths.plan(images, prompts)
            return caption(captioner, images, prompts, inputs)
        return caption_at_lengths
    return wrap


def regions_marked(stack, parts):
    """wrap for a captioner class's __init__: the model of the captioner that the loop builds (MiniGPT-4 builds a
    new one; the others share the benchmark's) gets bench/instrument.py's ranges until `stack` closes."""
    def wrap(init):
        @functools.wraps(init)
        def init_and_mark(captioner, *args, **kwargs):
            init(captioner, *args, **kwargs)
            stack.enter_context(marked_regions(captioner.model, language_model(captioner.model), parts))
        return init_and_mark
    return wrap


class ModelBench:
    """One model's measurements: the prefill/decode split, then the rows (the seed's loop, ours, and the profiled
    run), all on one random-weight model built once."""

    def __init__(self, name, spec, args, device, folder, names, peak, bandwidth):
        import transformers
        self.name, self.spec, self.args, self.device, self.folder = name, spec, args, device, folder
        self.peak, self.bandwidth = peak, bandwidth  # TFLOP/s, GB/s
        self.captioner_class = getattr(importlib.import_module(spec["script"]), spec["captioner"])
        self.model_class = getattr(transformers, spec["model_class"])
        self.checkpoint = spec["checkpoint"](folder, args.tiny)
        self.dtype_name = "float32" if args.tiny else "bfloat16"
        self.dtype = getattr(torch, self.dtype_name)
        self.paths = [folder / n for n in names]
        self.lengths = None
        if args.lengths == "realistic":
            prompt_keys = {text: key for key, text in self.captioner_class.prompts.items()}
            self.lengths = CaptionLengths(prompt_keys, args.new_tokens, args.lengths_seed)
        # the script's flags in every command line of the benchmark; fixed lengths: every caption exactly
        # --new-tokens long; realistic: EndAtLength decides
        self.script_flags = [spec.get("checkpoint_flag", "--model"), str(self.checkpoint), "--dtype", self.dtype_name,
                             "--temperature", "0", "--max-new-tokens", str(args.new_tokens)] + (
            ["--min-new-tokens", str(args.new_tokens)] if self.lengths is None else [])
        self.sync = functools.partial(sync, device)

    def run(self):
        """(rows, FLOPs per caption of --new-tokens tokens, prefill/decode split)"""
        with contextlib.ExitStack() as stack:
            # (inside run() only: the next model's checkpoint may load this class for real, as InternVL's does)
            stack.enter_context(patched(self.model_class, "from_pretrained",
                                        lambda real: random_weights_loader(self.model_class, self.device, self.dtype)))
            stack.enter_context(patched(self.model_class, "generate", marked_generate(self.lengths)))
            if self.lengths is not None:
                steps = Counter()
                stack.enter_context(patched(refill.Slots, "step", counted_steps(steps)))
                stack.enter_context(patched(refill, "generate", refill_at_lengths(self.lengths, steps)))
            self.captioner = self.build_captioner()
            self.sample = [self.captioner.prepare(open_image(p)) for p in self.paths[:len(IMAGE_SIZES)]]
            self.shape = ModelShape(self.captioner, self.spec["vision_names"])
            flops = self.flops(self.args.new_tokens)
            batch = [self.captioner.prepare(open_image(p)) for p in self.paths[:2]]
            self.captioner.caption(batch[:2], [self.captioner.prompts[self.captioner.default_prompt]])  # warm-up
            self.split = {size: self.measure_split(size) for size in self.args.split_batches}
            rows = [self.run_variant(*variant) for variant in self.variants()]
        return rows, flops, self.split

    def build_captioner(self):
        """One captioner for the processor and the model (built once, shared by every row), loaded as the loop loads
        it with --ours-flags: the split measures ours (on a GPU, the prefill compiled and decode steps as CUDA graphs
        unless --ours-flags turns them off)."""
        settings = script_settings(self.captioner_class,
                                   ["--input-json", "x", *self.script_flags, *self.args.ours_flags])
        self.attn_implementation = settings.attn_implementation
        captioner, _ = load_captioner(self.captioner_class, settings, self.device, self.dtype_name)
        return captioner

    def flops(self, new_tokens, prompts=1):
        return model_flops(self.shape, self.captioner, self.sample, self.spec["sizes"], new_tokens, prompts)

    def measure_split(self, size):
        """Prefill and decode of one batch as our loop forms it: the middle quarter of a read-ahead window of 4
        batches sorted by length."""
        captioner, args = self.captioner, self.args
        window = sorted((captioner.prepare(open_image(p)) for p in self.paths[:4 * size]), key=captioner.cost)
        images = window[len(window) * 3 // 8:][:size]
        prefill, step = prefill_and_decode(captioner, images, args.new_tokens, self.device)
        split = dict(prefill_s=round(prefill, 3), decode_step_ms=round(step * 1000, 2))
        if self.spec.get("prefill_parts"):
            split["prefill_parts"] = prefill_parts(captioner, images, self.spec["prefill_parts"], self.device)
        if args.profile is not None and self.device.type == "cuda":
            split["decode_gpu_busy_ms"] = round(profile_decode(captioner, images, 9, self.device), 2)
        print(json.dumps({"model": self.name, "batch": size, **split}), flush=True)
        return split

    def variants(self):
        """(kind, batch size, images, prompt keys) of each row."""
        args, spec = self.args, self.spec
        default = [self.captioner_class.default_prompt]
        multi = spec["multi_prompts"].split(",") if "multi_prompts" in spec else None
        seed_batches = [spec["seed_batch"]] * (args.seed_images > 0) + [args.big_batch] * (args.big_batch > 0)
        variants = [("seed", b, args.seed_images if b == spec["seed_batch"] else args.images, default)
                    for b in seed_batches]
        if self.lengths is not None and multi and args.big_batch:  # the passes differ in length: run all five
            variants.append(("seed", args.big_batch, args.images, multi))
        ours_images = args.ours_images or args.images
        variants += [("unpacked", batch, ours_images, default) for batch in args.ours_batches if batch and
                     args.unpacked_vision and spec["script"] == "qwen"]
        variants += [("ours", batch, ours_images, default) for batch in args.ours_batches if batch]
        if multi and args.multi_batch:
            variants.append(("ours", args.multi_batch, ours_images, multi))
        if args.refill_batch:  # with InternVL2's five prompts where the model has them
            variants += [("copied", args.refill_batch, ours_images, multi or default, rows)
                         for rows in args.copied_prefix_rows]
            variants += [("ours", args.refill_batch, ours_images, multi or default, rows) for rows in args.decode_rows]
        if args.oom_batch and self.device.type == "cuda":
            variants.append(("oom", args.oom_batch, args.oom_batch, default))
        if args.profile:
            prompts = args.profile_prompts.split(",") if args.profile_prompts else default
            variants.append(("profile", profile_batch(args), profiled_images(args), prompts))
        return variants

    def run_variant(self, kind, batch_size, images, prompts, decode_rows=None):
        images = min(images, len(self.paths))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if self.lengths is not None:
            self.lengths.reset()
        seconds = {}
        profile = (BatchProfile(self.args.profile_warmup, self.args.profile_batches, self.device) if kind == "profile"
                   else None)
        with contextlib.ExitStack() as stack:
            if self.lengths is not None:
                stack.enter_context(patched(self.captioner_class, "caption", planned_lengths(self.lengths)))
            self.sync()
            start = time.perf_counter()
            if kind == "seed":
                images = self.seed(batch_size, images, prompts)
            elif kind == "unpacked":  # Qwen's vision tower as transformers runs it: a call per image or window
                with patched(importlib.import_module("qwen"), "replace_vision_attention", lambda _: lambda _: None):
                    transformers_vision_attention(self.captioner.model.model.visual)
                    seconds = self.ours(batch_size, images, prompts)
            elif kind == "copied":  # each row's prefix in its slot, as before cascade attention
                with patched(refill, "cascades", lambda cascades: lambda model: False):
                    seconds = self.ours(batch_size, images, prompts, profile, decode_rows)
            elif kind == "oom":  # a batch that does not fit: the loop must halve it, and caption every image
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(self.args.oom_gib * 2 ** 30 / total)
                seconds = self.ours(batch_size, images, prompts)
                torch.cuda.set_per_process_memory_fraction(1.0)
            else:
                seconds = self.ours(batch_size, images, prompts, profile, decode_rows)
            self.sync()
            elapsed = time.perf_counter() - start
        row = self.row(kind, batch_size, images, prompts, elapsed, seconds, decode_rows)
        if profile:
            row["timeline"] = profile.report(os.path.join(self.args.profile, self.name))
        print(json.dumps({key: value for key, value in row.items() if key != "timeline"}), flush=True)
        if self.lengths is not None:
            print_lengths(row, self.split if kind != "seed" else {})  # the split times our decoding
        return row

    def seed(self, batch_size, images, prompts):
        """The seed's rows ran transformers' plain sdpa and generate(); returns the images captioned (0: it ran out
        of memory, which the seed's loop does not survive)."""
        eager_forwards(self.captioner.model)
        eager_decoding(self.captioner.model)
        set_attention(self.captioner.model, "sdpa")
        try:
            seed_loop(self.captioner, self.paths[:images], batch_size, prompts)
        except torch.cuda.OutOfMemoryError:
            images = 0
        set_attention(self.captioner.model, self.attn_implementation)
        torch.cuda.empty_cache()
        return images

    def ours(self, batch_size, images, prompts, profile=None, decode_rows=None):
        """The real script's loop on the first `images` images, its batches profiled by `profile` (a BatchProfile)
        if given; returns seconds inside caption() (the GPU's work and the CPU's beyond the inputs that the batcher
        thread made ahead; the rest of the loop's time is waiting for batches, writing and starting) and in the
        DataLoader's __next__ (the batcher thread waiting on the image workers)."""
        args, spec = self.args, self.spec
        out = self.folder / f"out-{self.name}-{batch_size}-{time.time()}"
        settings = script_settings(self.captioner_class, [
            "--input-json", str(self.folder / "input.json"), *self.script_flags, "--output-dir", str(out),
            "--batch-size", str(batch_size), "--num-workers", str(args.num_workers), "--limit", str(images),
            "--prompts", ",".join(prompts), *args.ours_flags,
            *(["--decode-rows", str(decode_rows)] if decode_rows else [])])
        seconds, calls = dict(in_caption=0.0), []
        with contextlib.ExitStack() as stack:
            stack.enter_context(patched(self.captioner_class, "caption",
                                        timed(seconds, "in_caption", self.sync, calls)))
            stack.enter_context(loader_wait(seconds))
            if profile:
                stack.enter_context(patched(self.captioner_class, "caption", profile))
                stack.enter_context(patched(self.captioner_class, "__init__",
                                            regions_marked(stack, spec.get("parts", {}))))
            status = caption_part(self.captioner_class, settings)
            if profile:
                profile.stop()  # when the run had no batch after the profiled ones
        if len(calls) > 1:  # the steady state: from the end of the first batch to the end of the run
            span = time.perf_counter() - calls[0][1]
            seconds["steady_outside_share"] = (span - sum(end - start for start, end in calls[1:])) / span
        lines = sum(1 for path in out.glob("*/*/*/captions-*.jsonl") for _ in open(path))
        assert status == 0 and lines == images * len(prompts), (status, lines)
        return seconds

    def row(self, kind, batch_size, images, prompts, elapsed, seconds, decode_rows=None):
        args, device = self.args, self.device
        label = {"oom": f"ours b{batch_size} in {args.oom_gib:g} GiB", "profile": f"ours b{batch_size} profiled",
                 "copied": f"ours b{batch_size}", "unpacked": f"ours b{batch_size}, vision per sequence"}.get(
                     kind, f"{kind} b{batch_size}")
        label += "" if images else " (CUDA out of memory)"
        label += f" x{len(prompts)} prompts" if len(prompts) > 1 else ""
        label += f", {decode_rows} decode rows refilled" if decode_rows else ""
        label += ", prefixes copied per row" if kind == "copied" else ""
        label += " (a pass each)" if kind == "seed" and len(prompts) > 1 else ""
        lengths = self.lengths.summary() if self.lengths is not None else None
        new_tokens = self.args.new_tokens if lengths is None else mean_new_tokens(lengths)
        flops = self.flops(new_tokens, len(prompts))
        rows_per_step = decode_rows or batch_size * (len(prompts) if kind != "seed" else 1)  # the seed: a pass each
        prefill_s, decode_s = speed_of_light(self.shape, self.captioner, self.sample, self.spec["sizes"], new_tokens,
                                             len(prompts), rows_per_step, self.peak, self.bandwidth)
        row = dict(model=self.name, variant=label, images=images, prompts=len(prompts), seconds=round(elapsed, 2),
                   images_per_s=round(images / elapsed, 3),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if device.type == "cuda" else None,
                   mfu=round(flops * images / elapsed / (self.peak * 1e12), 4) if self.peak == self.peak
                   else None,
                   in_caption_s=round(seconds["in_caption"], 2) if "in_caption" in seconds else None,
                   speed_of_light=round((prefill_s + decode_s) * images / elapsed, 4) if self.peak == self.peak
                   else None,
                   light_prefill_share=round(prefill_s / (prefill_s + decode_s), 3) if self.peak == self.peak
                   else None)
        if "loader_wait" in seconds:
            row["loader_wait_s"] = round(seconds["loader_wait"], 2)
        if "steady_outside_share" in seconds:
            row["steady_outside_share"] = round(seconds["steady_outside_share"], 4)
        if lengths is not None:
            row["lengths"] = lengths
        return row


def profile_batch(args):
    """Batch size of the profiled row."""
    batch = args.profile_batch or next((b for b in args.ours_batches if b), 0)
    if not batch:
        raise SystemExit("--profile DIR needs --profile-batch or a non-zero --ours-batches")
    return batch


def profiled_images(args):
    return profile_batch(args) * (args.profile_warmup + args.profile_batches + 1) if args.profile else 0


def mean_new_tokens(lengths):
    """Mean new tokens per caption of a realistic-lengths row: its caption tokens plus the end token where it
    ended (for MFU: the model FLOPs actually asked for)."""
    per_prompt = lengths["per_prompt"].values()
    captions = sum(p["captions"] for p in per_prompt)
    return sum(p["captions"] * (p["mean_tokens"] + 1 - p["truncated"]) for p in per_prompt) / max(captions, 1)


def print_lengths(row, split):
    """What decoding the row's static batches spent on rows that had already ended, and (given the split of our
    decoding) what a batch compacted at each step would save at most: the finished rows' share of the decode time,
    if a step's cost grew with its rows (at small batches a step is mostly the read of the weights, and compaction
    saves less; refilling the freed rows with new captions would not have that limit)."""
    lengths = row["lengths"]
    if not lengths["row_steps"]:
        return
    per_prompt = ", ".join(f"{key} {p['mean_tokens']:.1f} tokens ({p['truncated'] * 100:.0f}% at the limit)"
                           for key, p in lengths["per_prompt"].items())
    print(f"  lengths ({row['variant']}): {per_prompt}; digest {lengths['lengths_digest']}")
    print(f"  {lengths['finished_fraction'] * 100:.1f}% of decode row-steps were for rows that had ended "
          f"({lengths['finished_row_steps']} of {lengths['row_steps']}, {lengths['generate_calls']} generate() "
          f"calls, {lengths['decode_steps']} decode steps; {lengths['off_length']} rows did not end at their drawn "
          "length)")
    rows_per_step = lengths["row_steps"] / lengths["decode_steps"]
    size = min(split, key=lambda s: abs(s - rows_per_step)) if split else None
    if size and split[size]["decode_step_ms"] > 0:
        decode_s = lengths["decode_steps"] * split[size]["decode_step_ms"] / 1000
        saved = decode_s * lengths["finished_fraction"]
        print(f"  compaction: decode ~ {lengths['decode_steps']} steps x {split[size]['decode_step_ms']} ms (split at "
              f"b{size}, ~{rows_per_step:.0f} rows a step) = {decode_s:.1f} s of the row's {row['seconds']} s; "
              f"if a step cost in proportion to its rows, skipping finished rows would save {saved:.1f} s "
              f"({saved / row['seconds'] * 100:.1f}% of the row; run 23 in bench/RESULTS.md measured less)",
              flush=True)


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    peak, bandwidth = measured_peak_tflops(device), measured_bandwidth_gbs(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"bf16 matmul peak {peak:.0f} TFLOP/s, memory {bandwidth:.0f} GB/s", flush=True)
    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", peak_tflops=peak,
                   bandwidth_gbs=bandwidth,
                   torch=torch.__version__, new_tokens=args.new_tokens, lengths=args.lengths, rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_images(folder, max(args.images, args.ours_images, args.seed_images,
                                        4 * max(args.split_batches, default=0), profiled_images(args)))
        for name in args.models.split(","):
            rows, flops, split = ModelBench(name, MODELS[name], args, device, folder, names, peak, bandwidth).run()
            results["rows"] += rows
            results.setdefault("flops_per_caption", {})[name] = flops
            results.setdefault("prefill_decode", {})[name] = split
    print_table(results["rows"])
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    if args.smoke:
        with open(args.json) as f:
            assert {row["model"] for row in json.load(f)["rows"]} == set(args.models.split(","))
        print(f"smoke: every model ran; {args.json} written")


def print_table(rows):
    realistic = any("lengths" in r for r in rows)
    print(f"\n{'model':10} {'variant':36} {'images':>6} {'s':>8} {'images/s':>9} {'GiB':>6} {'MFU':>6} {'light':>6}"
          f" {'outside':>7} {'steady':>6} {'light in prefill':>16}" + (f" {'ended':>6}" if realistic else ""))
    for r in rows:
        ended = f" {r['lengths']['finished_fraction'] * 100:5.1f}%" if "lengths" in r else ""
        outside = (f"{(r['seconds'] - r['in_caption_s']) / r['seconds'] * 100:6.1f}%" if r["in_caption_s"] is not None
                   else "      -")
        steady = f"{r['steady_outside_share'] * 100:5.1f}%" if "steady_outside_share" in r else "     -"
        print(f"{r['model']:10} {r['variant']:36} {r['images']:6d} {r['seconds']:8.2f} {r['images_per_s']:9.2f} "
              f"{r['peak_gib'] or 0:6.1f} {(r['mfu'] or 0) * 100:5.1f}% {(r['speed_of_light'] or 0) * 100:5.1f}% "
              f"{outside} {steady} {(r['light_prefill_share'] or 0) * 100:15.0f}%{ended}")
    print("light: the row's share of its speed of light (prefill FLOPs at the matmul peak, decode's reads at the "
          "memory bandwidth); outside: the share of the row's time outside caption(), where the GPU has no work from "
          "the loop (start, waiting for a batch, writing); steady: the same from the end of the first batch on; light "
          "in prefill: the prefill's share of the speed of light")
    if realistic:
        print("ended: share of decode row-steps spent on rows that had already ended (static batches)")


SMOKE = dict(tiny=True, images=4, ours_images=0, seed_images=2, big_batch=2, ours_batches=[2], multi_batch=2,
             split_batches=[2], new_tokens=16, num_workers=1, profile_batch=1)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help=f"comma-separated: {', '.join(MODELS)} (default: qwen; "
                        "with --smoke, all)")
    parser.add_argument("--images", type=int, default=512, help="images for the batch-128 rows")
    parser.add_argument("--ours-images", type=int, default=0,
                        help="images for our rows (default: --images); more than the seed's rows so that the start "
                        "(workers filling the first read-ahead window) weighs as little as in a long run")
    parser.add_argument("--seed-images", type=int, default=24, help="images for the seed's own batch size (0: skip)")
    parser.add_argument("--big-batch", type=int, default=128, help="batch size of the seed's second row (0: skip)")
    parser.add_argument("--new-tokens", type=int, default=77, help="new tokens per caption (with --lengths "
                        "realistic: the limit, --max-new-tokens)")
    parser.add_argument("--lengths", choices=["fixed", "realistic"], default="fixed",
                        help="fixed: every caption exactly --new-tokens long; realistic: each (image, prompt) ends at "
                        "a length drawn from its prompt's distribution (bench/caption_lengths.py), and the rows "
                        "report the decode steps spent on captions that had ended; with InternVL2, the seed's five "
                        "passes get a row of their own")
    parser.add_argument("--lengths-seed", type=int, default=0, help="seed of the realistic lengths' draw")
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--ours-batches", type=lambda v: [int(b) for b in v.split(",")], default=[128],
                        help="batch sizes for our rows, comma-separated")
    parser.add_argument("--multi-batch", type=int, default=32,
                        help="batch size of the several-prompts row (InternVL2's five merge prompts; 0: skip)")
    parser.add_argument("--refill-batch", type=int, default=0, help="batch size of a row of ours with --decode-rows "
                        "(InternVL2's five prompts where the model has them; 0: skip)")
    parser.add_argument("--decode-rows", type=lambda v: [int(b) for b in v.split(",")], default=[80],
                        help="--decode-rows of the --refill-batch rows, comma-separated: a row each")
    parser.add_argument("--copied-prefix-rows", type=lambda v: [int(b) for b in v.split(",") if b], default=[],
                        help="--decode-rows of --refill-batch rows whose slots each hold their row's prefix, as before "
                        "cascade attention (run before the --decode-rows rows), comma-separated: a row each")
    parser.add_argument("--unpacked-vision", action="store_true", help="Qwen models: before each row of ours, the "
                        "same with the vision tower's attention as transformers runs it: one call per image or window, "
                        "the rotary embedding eager (qwen.VisionAttention compiles it and packs the windows)")
    parser.add_argument("--oom-batch", type=int, default=0,
                        help="an extra row of ours at this batch size with GPU memory capped at --oom-gib, to show the "
                        "out-of-memory backoff (0: skip)")
    parser.add_argument("--oom-gib", type=float, default=40)
    parser.add_argument("--split-batches", type=lambda v: [int(b) for b in v.split(",") if b], default=[64],
                        help="batch sizes whose prefill/decode split is measured (\"\": none, so that the first row "
                        "after the model's warm-up call is the first work of the process)")
    parser.add_argument("--ours-flags", nargs=argparse.REMAINDER, default=[], help="extra flags for our script")
    parser.add_argument("--profile", nargs="?", const="", default=None, metavar="DIR",
                        help="print the CUDA kernels of a few decode steps of each split batch; with DIR, also an "
                        "extra row of ours whose batches after --profile-warmup are profiled as a timeline: the "
                        "table is printed, DIR/<model> gets trace.json.gz and timeline.json (bench/timeline.py)")
    parser.add_argument("--profile-batch", type=int, default=0, help="batch size of the profiled row "
                        "(default: the first of --ours-batches)")
    parser.add_argument("--profile-prompts", default=None, metavar="KEY,KEY",
                        help="prompt keys of the profiled row (default: the model's default prompt)")
    parser.add_argument("--profile-warmup", type=int, default=2, help="batches of the profiled row before the "
                        "profiled ones")
    parser.add_argument("--profile-batches", type=int, default=3, help="consecutive steady-state batches in the "
                        "timeline (one is enough for a long batch: the profiler slows the run and its trace grows)")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints on the CPU: checks the benchmark")
    parser.add_argument("--smoke", action="store_true", help="--tiny with a few images and small batches, every "
                        "model unless --models says otherwise: checks in about a minute that the benchmark runs and "
                        "writes its JSON (add --lengths realistic, --profile DIR to check those)")
    parser.add_argument("--json", default="bench/out/throughput.json")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    args.models = args.models or (",".join(MODELS) if args.smoke else "qwen")
    return args


if __name__ == "__main__":
    main()
