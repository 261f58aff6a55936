"""One decode step's attention (one new token per row against a left-padded KV cache) with each way PyTorch can
run it, at the shapes our batches have.

    python bench/decode_attention.py --json bench/out/decode_attention.json

Why: MiniGPT-4's decode steps spent 5 of their 12.6 ms of GPU time in cuDNN's attention kernel (run 20's
profile), which SDPA picks for a padding mask and which tiles 16 queries where a step has one. Models without
grouped heads (Vicuna in MiniGPT-4 and LLaVA-1.5) take transformers' sdpa path; those with grouped heads
(Qwen2-VL, InternLM2) take sdpa_grouped's layout, the group's query heads as the query length.
Variants: `sdpa` (its default backend order), `efficient` and `math` (one SDPA backend only), `cudnn`, and
`matmul` (scores, softmax in float32, weighted sum: two batched matrix products). Each is timed as the median of
--repeats runs of all layers' worth of calls (--layers); the error is the largest difference from `math` in
float32. Times are GPU times: the calls are recorded as one CUDA graph and replayed.
"""
import argparse
import json
import os
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# name: (rows, query heads, key/value heads, head dim, cache length, layers): our batch sizes, caches at their
# length after the prompt and 77 new tokens (the bench's image mix), the models' published configs.
SHAPES = {
    "minigpt4 b128": (128, 32, 32, 128, 190, 32),
    "llava-7b b128": (128, 32, 32, 128, 690, 32),
    "llava-13b b64": (64, 40, 40, 128, 690, 40),
    "qwen2-vl-7b b256": (256, 28, 4, 128, 560, 28),
    "internvl2-8b b128": (128, 32, 8, 128, 1900, 32),
    "internvl2-8b b16x5": (80, 32, 8, 128, 1950, 32),
}


def inputs(rows, heads, kv_heads, dim, length, dtype, device, generator):
    """query in the layout the kernel gets (grouped heads as the query length), keys, values, a boolean
    left-padding mask (rows keep between half and all of the cache)."""
    groups = heads // kv_heads
    query = torch.randn(rows, kv_heads, groups, dim, device=device, dtype=dtype, generator=generator)
    key, value = (torch.randn(rows, kv_heads, length, dim, device=device, dtype=dtype, generator=generator)
                  for _ in range(2))
    start = torch.randint(0, length // 2, (rows, 1), device=device, generator=generator)
    mask = (torch.arange(length, device=device) >= start)[:, None, None, :]
    return query, key, value, mask


def matmul_attention(query, key, value, mask):
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * query.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)


def sdpa_with(backends):
    def attention(query, key, value, mask):
        if backends is None:
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return attention


VARIANTS = {
    "sdpa": sdpa_with(None),
    "cudnn": sdpa_with([SDPBackend.CUDNN_ATTENTION]),
    "efficient": sdpa_with([SDPBackend.EFFICIENT_ATTENTION]),
    "math": sdpa_with([SDPBackend.MATH]),
    "matmul": matmul_attention,
}


def median_ms(function, args, layers, repeats):
    """GPU time of `layers` calls, recorded once as a CUDA graph (as our decode steps run) and replayed."""
    function(*args)  # warm-up: kernel selection and workspace outside the recording
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            function(*args)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    results = []
    print(f"{'shape':22}" + "".join(f"{name:>12}" for name in VARIANTS) + "   (ms per step, all layers)")
    for shape, (rows, heads, kv_heads, dim, length, layers) in SHAPES.items():
        exact = inputs(rows, heads, kv_heads, dim, length, torch.float32, device, generator)
        reference = VARIANTS["math"](*exact)
        bf16 = [t if t.dtype == torch.bool else t.to(torch.bfloat16) for t in exact]
        row = {"shape": shape, "rows": rows, "heads": heads, "kv_heads": kv_heads, "cache": length, "layers": layers}
        for name, function in VARIANTS.items():
            row[name] = {}
            try:
                row[name]["ms"] = round(median_ms(function, bf16, layers, args.repeats), 3)
                row[name]["float32_error"] = (function(*exact) - reference).abs().max().item()
            except RuntimeError as e:  # a backend that does not take these inputs (cuDNN: no float32)
                row[name]["error"] = str(e).splitlines()[0]
        results.append(row)
        print(f"{shape:22}" + "".join(f"{row[name].get('ms', float('nan')):12.3f}" for name in VARIANTS))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
