"""GPU throughput of the captioning scripts against the seed's loop, on real-size random-weight models.

    python bench/throughput.py --models qwen --json bench/out/throughput.json

For each model: the real architecture (its published config) is built with random weights directly on
the GPU, the tokenizer and processor files come from the tests' tiny checkpoints (token ids do not
change the work), and decoding is fixed at --new-tokens new tokens (min = max) so every variant does
the same work. Images: a mix of typical web-image sizes written as JPEG files.

Rows:
  seed bN   the seed's loop: images opened and preprocessed synchronously in the loop, one generate()
            per batch of N in input order.
  ours bN   the real script's loop (utils/captioning.py): worker processes, batches sorted by length,
            out-of-memory backoff, sdpa_grouped attention, lines written to disk.
  ours bN xK prompts   the same with K prompts in one pass (InternVL2's five merge prompts); its
            images/s counts images, each with K captions.
Columns: images/s, prefill and decode time of one batch, peak GPU memory, and model FLOPs utilisation
(model FLOPs per caption x images/s / measured bf16 matmul peak).

--tiny runs the same code on the tests' tiny checkpoints on the CPU, to check the benchmark itself.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from utils.captioning import build_parser, caption_shard  # noqa: E402
from utils.cuda_graphs import decode_with_cuda_graphs  # noqa: E402
from utils.images import open_image  # noqa: E402

# Typical CC3M/CC12M image sizes (width, height); Qwen2-VL turns them into ~100 to ~900 image tokens.
IMAGE_SIZES = [(500, 375), (640, 480), (800, 600), (1024, 576), (400, 600), (300, 300), (960, 640), (640, 427)]

QWEN2_VL_7B = dict(
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
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


def eager_decoding(model):
    """Undo decode_with_cuda_graphs: the seed's rows decode as plain generate() does."""
    for module in model.modules():
        for name in ("generate", "get_compiled_call", "_decode_step_graph"):
            module.__dict__.pop(name, None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- Qwen2-VL

def qwen_checkpoint(folder, tiny):
    from qwen_checkpoint import make_checkpoint
    from transformers import Qwen2VLConfig
    path = make_checkpoint(folder / "qwen")
    if not tiny:  # the real architecture and pixel limits; weights are made on the GPU, not read
        config = Qwen2VLConfig.from_pretrained(path)
        real = Qwen2VLConfig(**QWEN2_VL_7B, image_token_id=config.image_token_id,
                             video_token_id=config.video_token_id, vision_start_token_id=config.vision_start_token_id,
                             vision_end_token_id=config.vision_end_token_id)
        real.text_config.eos_token_id = config.text_config.eos_token_id
        real.text_config.pad_token_id = config.text_config.pad_token_id
        real.save_pretrained(path)
        processor_config = json.loads((path / "processor_config.json").read_text())
        processor_config["image_processor"]["size"] = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}
        (path / "processor_config.json").write_text(json.dumps(processor_config))
    return path


def qwen_sizes(captioner, prepared):
    """(prompt tokens, vision-tower patches) of one prepared image."""
    return prepared.tokens + 30, int(prepared.grid_thw.prod())


# ----------------------------------------------------------------------------------------------- InternVL2

INTERNVL2_8B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           qkv_bias=True, qk_normalization=False, norm_type="layer_norm")
INTERNVL2_8B_LLM = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        num_hidden_layers=32, vocab_size=92553, max_position_embeddings=32768, rope_theta=1000000,
                        rope_scaling={"type": "dynamic", "factor": 2.0})


def internvl_checkpoint(folder, tiny):
    """A native InternVL2 folder: the tests' tiny original checkpoint converted, then (not tiny) given the
    InternVL2-8B architecture (InternViT-300M + InternLM2.5-7B)."""
    from internvl import native_config
    from internvl_checkpoint import build_checkpoint
    from internvl import convert_checkpoint
    original = Path(build_checkpoint(str(folder / "internvl-original")))
    native = Path(convert_checkpoint(str(original), str(folder / "internvl")))
    if not tiny:
        # Random weights emit ids past the tiny tokenizer's vocabulary: decode those as <unk> (id 0).
        import internvl
        decode = internvl.InternLM2Tokenizer.decode
        size = internvl.load_tokenizer(str(native)).sp.get_piece_size()
        internvl.InternLM2Tokenizer.decode = lambda self, ids, **kw: decode(self, [i if i < size else 0 for i in ids], **kw)
        config = json.loads((original / "config.json").read_text())
        config["vision_config"].update(INTERNVL2_8B_VISION)
        config["llm_config"].update(INTERNVL2_8B_LLM)
        native_config(config).save_pretrained(native)
    return native


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
        from llava_checkpoint import build_checkpoints
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
    from minigpt4_checkpoint import build
    root = build(str(folder / "minigpt4"))
    os.environ["TORCH_HOME"] = f"{root}/torch_home"
    if not tiny:
        minigpt4.load_model = minigpt4_real_size
        size = minigpt4.SlowLlamaTokenizer(f"{root}/vicuna/tokenizer.model").sp.get_piece_size()
        decode = minigpt4.SlowLlamaTokenizer.decode  # random weights emit ids past the tiny vocabulary
        minigpt4.SlowLlamaTokenizer.decode = lambda self, ids: decode(self, [i if i < size else 0 for i in ids])
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


def model_flops(captioner, prepared_images, sizes, vision_names, new_tokens):
    """Model FLOPs per caption: 2 x parameters x tokens for the language model and the vision tower, plus
    attention (4 x layers x hidden size x context, per token)."""
    model = captioner.model
    vision = sum(p.numel() for n, p in model.named_parameters() if any(v in n for v in vision_names))
    embeddings = language_model(model).get_input_embeddings().weight.numel()
    text = sum(p.numel() for p in model.parameters()) - vision - embeddings
    config = language_model(model).config.get_text_config()
    total = 0
    for prepared in prepared_images:
        prompt, patches = sizes(captioner, prepared)
        tokens = prompt + new_tokens
        attention = 4 * config.num_hidden_layers * config.hidden_size * tokens * tokens / 2
        total += 2 * text * tokens + 2 * vision * patches + attention
    return total / len(prepared_images)


def set_attention(model, implementation):
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and module.config._attn_implementation != implementation:
            module.set_attn_implementation(implementation)


def seed_loop(captioner, paths, batch_size):
    """The seed's loop: each image opened and preprocessed in the loop itself, one generate() per batch, in
    input order, one prompt."""
    prompt = captioner.prompts[captioner.default_prompt]
    for start in range(0, len(paths), batch_size):
        captioner.caption([captioner.prepare(open_image(p)) for p in paths[start:start + batch_size]], [prompt])


MODELS = {
    "qwen": dict(script="qwen", captioner="QwenCaptioner", model_class="Qwen2VLForConditionalGeneration",
                 checkpoint=qwen_checkpoint, sizes=qwen_sizes, vision_names=("visual",), seed_batch=3,
                 prefill_parts=("model.visual", "model.get_rope_index", "model.language_model", "lm_head")),
    "internvl": dict(script="internvl", captioner="InternVLCaptioner", model_class="InternVLForConditionalGeneration",
                     checkpoint=internvl_checkpoint, sizes=internvl_sizes,
                     vision_names=("vision_tower", "multi_modal_projector"), seed_batch=20,
                     multi_prompts="detail,noun,background,main,style"),
    "llava-7b": dict(script="llava", captioner="LlavaCaptioner", model_class="LlavaForConditionalGeneration",
                     checkpoint=llava_checkpoint("7b"), sizes=llava_sizes,
                     vision_names=("vision_tower", "multi_modal_projector"), seed_batch=8),
    "llava-13b": dict(script="llava", captioner="LlavaCaptioner", model_class="LlavaForConditionalGeneration",
                      checkpoint=llava_checkpoint("13b"), sizes=llava_sizes,
                      vision_names=("vision_tower", "multi_modal_projector"), seed_batch=8),
    "minigpt4": dict(script="minigpt4", captioner="MiniGPT4Captioner", model_class="LlamaForCausalLM",
                     checkpoint=minigpt4_checkpoint, sizes=minigpt4_sizes, checkpoint_flag="--cfg-path",
                     vision_names=("vision_model", "ln_vision", "qformer", "query_tokens", "llama_proj"), seed_batch=3),
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
    prefill (generate with one new token); the GPU is synchronised around each part."""
    import functools
    seconds = dict.fromkeys(parts, 0.0)
    undo = []
    for name in parts:
        owner_name, _, attribute = name.rpartition(".")
        owner = captioner.model.get_submodule(owner_name) if owner_name else captioner.model
        target = getattr(owner, attribute)
        if isinstance(target, torch.nn.Module):
            owner, attribute, target = target, "forward", target.forward

        def timed(*args, _name=name, _target=target, **kwargs):
            sync(device)
            start = time.perf_counter()
            result = _target(*args, **kwargs)
            sync(device)
            seconds[_name] += time.perf_counter() - start
            return result
        setattr(owner, attribute, functools.wraps(target)(timed))
        undo.append((owner, attribute))
    sync(device)
    start = time.perf_counter()
    caption_exactly(captioner, images, 1)
    sync(device)
    total = time.perf_counter() - start
    for owner, attribute in undo:
        del owner.__dict__[attribute]
    return dict(total_s=round(total, 3), **{name: round(s, 3) for name, s in seconds.items()})


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
    print(f"decode, batch {len(images)}: GPU busy {sum(ms for ms, _ in decode):.2f} ms per step; top kernels (ms/step):")
    for ms, key in decode[:15]:
        print(f"  {ms:8.3f}  {key[:110]}")
    return sum(ms for ms, _ in decode)


def run_model(name, spec, args, device, folder, names, peak):
    import importlib

    import transformers
    module = importlib.import_module(spec["script"])
    captioner_class = getattr(module, spec["captioner"])
    model_class = getattr(transformers, spec["model_class"])
    checkpoint = spec["checkpoint"](folder, args.tiny)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model_class.from_pretrained = random_weights_loader(model_class, device, dtype)
    paths = [folder / n for n in names]

    def ours(batch_size, images, prompts):
        out = folder / f"out-{name}-{batch_size}-{time.time()}"
        cli = ["--input-json", str(folder / "input.json"), spec.get("checkpoint_flag", "--model"), str(checkpoint),
               "--output-dir",
               str(out), "--batch-size", str(batch_size),
               "--max-new-tokens", str(args.new_tokens), "--min-new-tokens", str(args.new_tokens),
               "--temperature", "0", "--num-workers", str(args.num_workers), "--limit", str(images),
               "--dtype", "float32" if args.tiny else "bfloat16", *args.ours_flags]
        parsed = build_parser(captioner_class).parse_args(cli)
        # Time inside caption() (the GPU's work and the inputs it builds); the rest of the loop's time is waiting
        # for prepared images, writing and starting.
        caption = captioner_class.caption
        in_caption = [0.0]

        def timed_caption(self, *caption_args):
            sync(device)
            start = time.perf_counter()
            try:
                return caption(self, *caption_args)
            finally:
                sync(device)
                in_caption[0] += time.perf_counter() - start
        captioner_class.caption = timed_caption
        try:
            status = caption_shard(captioner_class, parsed, {key: captioner_class.prompts[key] for key in prompts},
                                   0, 1, 0)
        finally:
            captioner_class.caption = caption
        lines = sum(1 for path in out.glob("*/*/*/captions-*.jsonl") for _ in open(path))
        assert status == 0 and lines == images * len(prompts), (status, lines)
        return in_caption[0]

    # One captioner for the processor and the model (built once, shared by every row).
    parsed = build_parser(captioner_class).parse_args(["--input-json", "x", spec.get("checkpoint_flag", "--model"),
                                                        str(checkpoint),
                                                        "--max-new-tokens", str(args.new_tokens),
                                                        "--min-new-tokens", str(args.new_tokens), "--temperature", "0"])
    parsed.dtype = dtype
    captioner = captioner_class(parsed, device)
    if device.type == "cuda" and "--no-cuda-graphs" not in args.ours_flags:  # the split measures our decoding
        decode_with_cuda_graphs(captioner.model, getattr(captioner, "unread_in_decode", ()))
    flops = model_flops(captioner, [captioner.prepare(open_image(p)) for p in paths[:len(IMAGE_SIZES)]],
                        spec["sizes"], spec["vision_names"], args.new_tokens)
    batch = [captioner.prepare(open_image(p)) for p in paths[:2]]
    captioner.caption(batch[:2], [captioner.prompts[captioner.default_prompt]])  # warm-up
    split = {}
    for size in args.split_batches:
        # One batch as our loop forms it: the middle quarter of a read-ahead window of 4 batches sorted by length.
        window = [captioner.prepare(open_image(p)) for p in paths[:4 * size]]
        if hasattr(captioner, "cost"):  # models whose prompt length varies per image
            window.sort(key=captioner.cost)
        images = window[len(window) * 3 // 8:][:size]
        prefill, step = prefill_and_decode(captioner, images, args.new_tokens, device)
        split[size] = dict(prefill_s=round(prefill, 3), decode_step_ms=round(step * 1000, 2))
        if spec.get("prefill_parts"):
            split[size]["prefill_parts"] = prefill_parts(captioner, images, spec["prefill_parts"], device)
        if args.profile and device.type == "cuda":
            split[size]["decode_gpu_busy_ms"] = round(profile_decode(captioner, images, 9, device), 2)
        print(json.dumps({"model": name, "batch": size, **split[size]}), flush=True)
    rows = []
    default = [captioner_class.default_prompt]
    variants = [("seed", batch, args.seed_images if batch == spec["seed_batch"] else args.images, default)
                for batch in [spec["seed_batch"]] * (args.seed_images > 0) + [args.big_batch] * (args.big_batch > 0)]
    ours_images = args.ours_images or args.images
    variants += [("ours", batch, ours_images, default) for batch in args.ours_batches if batch]
    if "multi_prompts" in spec and args.multi_batch:
        variants.append(("ours", args.multi_batch, ours_images, spec["multi_prompts"].split(",")))
    if args.oom_batch and device.type == "cuda":
        variants.append(("oom", args.oom_batch, args.oom_batch, default))
    for kind, batch_size, images, prompts in variants:
        images = min(images, len(paths))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        in_caption = None
        if kind == "seed":  # the seed ran transformers' plain sdpa and generate()
            eager_decoding(captioner.model)
            set_attention(captioner.model, "sdpa")
            try:
                seed_loop(captioner, paths[:images], batch_size)
            except torch.cuda.OutOfMemoryError:  # the seed's loop has no way around it: it crashes
                images = 0
            set_attention(captioner.model, parsed.attn_implementation)
            torch.cuda.empty_cache()
        elif kind == "ours":
            in_caption = ours(batch_size, images, prompts)
        else:  # a batch that does not fit: the loop must halve it, and caption every image
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(args.oom_gib * 2 ** 30 / total)
            in_caption = ours(batch_size, images, prompts)
            torch.cuda.set_per_process_memory_fraction(1.0)
        sync(device)
        seconds = time.perf_counter() - start
        label = f"ours b{batch_size} in {args.oom_gib:g} GiB" if kind == "oom" else f"{kind} b{batch_size}"
        label += "" if images else " (CUDA out of memory)"
        row = dict(model=name, variant=label + (f" x{len(prompts)} prompts" if len(prompts) > 1 else ""),
                   images=images, prompts=len(prompts), seconds=round(seconds, 2), images_per_s=round(images / seconds, 3),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if device.type == "cuda" else None,
                   mfu=round(flops * images * len(prompts) / seconds / (peak * 1e12), 4) if peak == peak else None,
                   in_caption_s=in_caption and round(in_caption, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, flops, split


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--images", type=int, default=512, help="images for the batch-128 rows")
    parser.add_argument("--ours-images", type=int, default=0,
                        help="images for our rows (default: --images); more than the seed's rows so that the start "
                        "(workers filling the first read-ahead window) weighs as little as in a long run")
    parser.add_argument("--seed-images", type=int, default=24, help="images for the seed's own batch size (0: skip)")
    parser.add_argument("--big-batch", type=int, default=128, help="batch size of the seed's second row (0: skip)")
    parser.add_argument("--new-tokens", type=int, default=77)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--ours-batches", type=lambda v: [int(b) for b in v.split(",")], default=[128],
                        help="batch sizes for our rows, comma-separated")
    parser.add_argument("--multi-batch", type=int, default=32,
                        help="batch size of the several-prompts row (InternVL2's five merge prompts; 0: skip)")
    parser.add_argument("--oom-batch", type=int, default=0,
                        help="an extra row of ours at this batch size with GPU memory capped at --oom-gib, to show the "
                        "out-of-memory backoff (0: skip)")
    parser.add_argument("--oom-gib", type=float, default=40)
    parser.add_argument("--split-batches", type=lambda v: [int(b) for b in v.split(",")], default=[64],
                        help="batch sizes whose prefill/decode split is measured")
    parser.add_argument("--ours-flags", nargs=argparse.REMAINDER, default=[], help="extra flags for our script")
    parser.add_argument("--profile", action="store_true", help="print the CUDA kernels of a few decode steps")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints on the CPU: checks the benchmark")
    parser.add_argument("--json", default="bench/out/throughput.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    peak = measured_peak_tflops(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", peak_tflops=peak,
                   torch=torch.__version__, new_tokens=args.new_tokens, rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_images(folder, max(args.images, args.ours_images, args.seed_images, 4 * max(args.split_batches)))
        for name in args.models.split(","):
            rows, flops, split = run_model(name, MODELS[name], args, device, folder, names, peak)
            results["rows"] += rows
            results.setdefault("flops_per_caption", {})[name] = flops
            results.setdefault("prefill_decode", {})[name] = split
    print(f"\n{'model':10} {'variant':22} {'images':>6} {'s':>8} {'images/s':>9} {'GiB':>6} {'MFU':>6}")
    for r in results["rows"]:
        print(f"{r['model']:10} {r['variant']:22} {r['images']:6d} {r['seconds']:8.2f} {r['images_per_s']:9.2f} "
              f"{r['peak_gib'] or 0:6.1f} {(r['mfu'] or 0) * 100:5.1f}%")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
