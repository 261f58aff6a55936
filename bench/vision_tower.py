"""Qwen2-VL-7B's vision tower alone, at real size with random weights: each way of running its attention over the
batches the loop forms (the benchmark's image mix, sorted by size, batches of --batch), timed on the GPU.

    python -m bench.vision_tower --json bench/out/vision_tower.json

Rows, each with the tower's MLPs compiled as the script compiles them (utils/generation/compiled_prefill.py):
  transformers              transformers' VisionAttention: the rotary embedding eager, one SDPA call per image
  ours, rotary eager        qwen.VisionAttention without its compiled part
  ours                      qwen.VisionAttention as the script runs it: the rotary embedding compiled
  ours, images padded       the same with the images in one masked SDPA call per layer, padded to the longest
  ours, images by varlen    the same with FlashAttention's varlen kernel (torch.nn.attention.varlen) instead
  transformers, block compiled   the whole vision block compiled (norms, rotary embedding, residuals)
Each row gives its seconds per pass over --images images and its output's largest difference from the first row's.
"""
import argparse
import json
import os
import time

import torch

import qwen
from bench.instrument import patched
from bench.throughput import IMAGE_SIZES, QWEN2_VL_7B, sync, transformers_vision_attention
from utils.generation import attention
from utils.generation.attention import PaddedLayout
from utils.generation.compiled_prefill import compile_prefill, eager_forwards


def grids(count):
    """(frames, rows, columns) of each image of the benchmark's mix, resized as qwen_vl_utils resizes it, in the
    order of the loop's sorted batches."""
    from qwen_vl_utils.vision_process import smart_resize
    sizes = []
    for i in range(count):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        rows, columns = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
        sizes.append((1, rows // 14, columns // 14))
    return sorted(sizes, key=lambda grid: grid[1] * grid[2])


def vision_tower(device, depth):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    config = Qwen2VLVisionConfig(**{**QWEN2_VL_7B["vision_config"], "depth": depth})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return Qwen2VisionTransformerPretrainedModel._from_config(config, dtype=torch.bfloat16).eval()


def varlen_attention(query, key, value, layout, scale):
    from torch.nn.attention.varlen import varlen_attn
    boundaries = layout.boundaries.to(query.device, torch.int32)
    return varlen_attn(query, key, value, boundaries, boundaries, layout.longest, layout.longest)  # scale: the default


def compile_blocks(visual):
    eager_forwards(visual)  # the MLPs' own compiled code: the block's covers them
    code = torch.compile(type(visual.blocks[0]).forward, dynamic=True)
    for block in visual.blocks:
        block.forward = lambda *args, block=block, **kwargs: code(block, *args, **kwargs)


def batches(grid_list, batch, device):
    """(pixel values, grids) of each batch: random patches on the GPU."""
    for start in range(0, len(grid_list), batch):
        grid = torch.tensor(grid_list[start:start + batch])
        patches = int(grid.prod(-1).sum())
        yield torch.randn(patches, 3 * 2 * 14 * 14, device=device, dtype=torch.bfloat16), grid


def run_tower(visual, inputs, device, pad_images):
    """The tower's output of every batch, with the layout made on the CPU as qwen.py makes it."""
    from transformers.vision_utils import get_vision_position_ids
    outputs = []
    for pixel_values, grid in inputs:
        vision = qwen.vision_layout(visual, grid)
        if pad_images:
            vision["padded_layouts"] = (PaddedLayout.of(vision["cu_seqlens"]),)
        layout = qwen.layout_on_device(vision, device, boundaries_on_gpu=False)
        layout["position_ids"] = get_vision_position_ids(grid, visual.spatial_merge_size).to(device)
        with qwen.given_layout(visual, layout):
            outputs.append(visual(pixel_values, grid_thw=grid.to(device)).pooler_output)
    return outputs


def measure(visual, inputs, device, repeats, pad_images):
    """(seconds per pass over `inputs`, the last pass's outputs), after a warm-up pass that compiles."""
    with torch.inference_mode():
        outputs = run_tower(visual, inputs, device, pad_images)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            outputs = run_tower(visual, inputs, device, pad_images)
        sync(device)
    return (time.perf_counter() - start) / repeats, outputs


def set_attention(visual, ours, compiled):
    """ours: qwen.VisionAttention (its compiled part if `compiled`), else transformers' own."""
    transformers_vision_attention(visual)
    if ours:
        qwen.replace_vision_attention(visual)
        for block in visual.blocks:
            block.attn.forward.compile_wait = True if compiled else None


# name: (qwen.VisionAttention, its rotary embedding compiled, images padded, padded_attention's stand-in, the
# whole block compiled)
WAYS = {"transformers": (False, False, False, None, False), "ours, rotary eager": (True, False, False, None, False),
        "ours": (True, True, False, None, False), "ours, images padded": (True, True, True, None, False),
        "ours, images by varlen": (True, True, True, varlen_attention, False),
        "transformers, block compiled": (False, False, False, None, True)}


def timed_rows(visual, inputs, device, repeats):
    rows, reference = [], None
    for name, (ours, compiled, pad_images, attend, block) in WAYS.items():
        row = dict(variant=name)
        try:
            set_attention(visual, ours, compiled)
            if block:
                compile_blocks(visual)
            with patched(attention, "padded_attention", lambda original: attend or original):
                seconds, outputs = measure(visual, inputs, device, repeats, pad_images)
        except Exception as error:  # noqa: BLE001  (the other rows still run)
            row["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
            print(json.dumps(row), flush=True)
            continue
        reference = reference or outputs
        row.update(seconds=round(seconds, 4), max_difference=max(
            float((a.float() - b.float()).abs().max()) for a, b in zip(outputs, reference)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--depth", type=int, default=32, help="vision blocks (Qwen2-VL-7B: 32)")
    parser.add_argument("--device", default="cuda", help="cpu: a check that the benchmark runs (use few --images)")
    parser.add_argument("--json", default="bench/out/vision_tower.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    visual = vision_tower(device, args.depth)
    compile_prefill(visual, wait=True)
    inputs = list(batches(grids(args.images), args.batch, device))
    rows = timed_rows(visual, inputs, device, args.repeats)
    first = rows[0]["seconds"]
    print(f"{'variant':30} {'s / ' + str(args.images) + ' images':>18} {'vs transformers':>16} {'max diff':>9}")
    for row in rows:
        print(f"{row['variant']:30} {row['seconds']:18.3f} {first / row['seconds']:15.2f}x "
              f"{row['max_difference']:9.4f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", depth=args.depth,
                       images=args.images, batch=args.batch, rows=rows), f, indent=1)

if __name__ == "__main__":
    main()
