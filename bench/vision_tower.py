"""Qwen2-VL-7B's vision tower on one batch, with PyTorch's SDPA backends in their default order (Flash
Attention 2 for its head dim 80) and with cuDNN attention first (Hopper's wgmma kernels).

    python bench/vision_tower.py --json bench/out/vision_tower.json
    python bench/vision_tower.py --size 448x448 --images 256

The real vision tower (its published config, random weights) under a one-layer language model that is
never run. Images: bench/throughput.py's mix of typical web-image sizes
(or --size for all), resized as Qwen2-VL's default pixel budget does (sides rounded to multiples of 28
within 56x56 and 12.8 megapixels); pixel values are random. TFLOP/s: the FLOPs PyTorch's flop counter
counts for the batch (matmuls, convolution, attention) over the median time of --repeats runs.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from qwen_vl_utils import smart_resize
from torch.utils.flop_counter import FlopCounterMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.throughput import IMAGE_SIZES, QWEN2_VL_7B, measured_peak_tflops  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # Qwen2-VL's default pixel budget
TINY_TEXT = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
                 bos_token_id=None, eos_token_id=0, pad_token_id=0)


def image_grid(sizes, device):
    """(images, 3) patch grids: one frame, rows and columns of 14-pixel patches after the resize."""
    resized = [smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS) for width, height in sizes]
    return torch.tensor([[1, height // 14, width // 14] for height, width in resized], device=device)


def timed_ms(model, pixel_values, grid, repeats):
    """Median milliseconds of the vision tower on the batch, after one warm-up run; and its output."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            output = model.model.visual(pixel_values, grid_thw=grid).pooler_output
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:]), output


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", help="WIDTHxHEIGHT of every image (default: bench/throughput.py's mix)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    sizes = [tuple(map(int, args.size.split("x")))] if args.size else IMAGE_SIZES
    grid = image_grid([sizes[i % len(sizes)] for i in range(args.images)], device)
    patches = int(grid.prod(-1).sum())
    vision = QWEN2_VL_7B["vision_config"]
    pixel_values = torch.randn(patches, 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2,
                               device=device, dtype=dtype)
    config = Qwen2VLConfig(vision_config=vision, text_config=TINY_TEXT)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype,
                                                             attn_implementation="sdpa").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.visual(pixel_values, grid_thw=grid)
    flops = counter.get_total_flops()
    peak = measured_peak_tflops(device)

    rows = {}
    default_ms, default_output = timed_ms(model, pixel_values, grid, args.repeats)
    rows["default"] = dict(ms=default_ms)
    cudnn_first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]
    with sdpa_kernel(cudnn_first, set_priority=True):
        cudnn_ms, cudnn_output = timed_ms(model, pixel_values, grid, args.repeats)
    difference = (cudnn_output - default_output).abs().max() / default_output.abs().max()
    rows["cudnn first"] = dict(ms=cudnn_ms, max_relative_difference=float(difference))
    for row in rows.values():
        row.update(tflops=flops / row["ms"] / 1e9, speedup=default_ms / row["ms"])
        row["of_peak"] = row["tflops"] / peak

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}: {args.images} images, "
          f"{patches} patches, {flops / 1e12:.1f} TFLOP per batch, matmul peak {peak:.0f} TFLOP/s")
    print(f"{'SDPA':12} {'ms/batch':>9} {'TFLOP/s':>8} {'of peak':>8} {'speed-up':>9}")
    for name, row in rows.items():
        print(f"{name:12} {row['ms']:9.1f} {row['tflops']:8.1f} {row['of_peak']:8.1%} {row['speedup']:8.2f}x")
    print(f"cudnn first vs default output: max difference {difference:.2e} of the largest value")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                           images=args.images, size=args.size or "mix", patches=patches, flops=flops,
                           peak_tflops=peak, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
