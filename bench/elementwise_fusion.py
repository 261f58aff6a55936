"""What fusing a decoder layer's elementwise work saves, and what it changes: eager PyTorch against torch.compile on
Qwen2-7B-sized layers (hidden 3584, MLP 18944, 28 heads, 4 KV heads; Qwen2-VL-7B's language model), bf16.

    python bench/elementwise_fusion.py --json bench/out/elementwise_fusion.json
    python bench/elementwise_fusion.py --smoke     # CPU, tiny sizes: checks the script

Pieces: an RMSNorm (float32 inside), SiLU(gate) x up, and the rotary embedding of q and k, each alone over
--tokens tokens, eager and compiled: ms, and the share of output elements that differ from eager.
Layers: a stack of --layers decoder layers, eager, then each layer compiled as one would for captioning (one
compiled code for all layers: `layer_idx` not specialised; intermediates rounded to bf16 where eager rounds them:
inductor's `emulate_precision_casts`), at prefill shapes and decode shapes (one token per row): ms, speed-up, the
share of the last hidden state's elements that differ from eager, and the largest difference. The first call of
each shape includes its compiling.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2 import modeling_qwen2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.throughput import QWEN2_VL_7B, sync  # noqa: E402

SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
QWEN2_7B = {name: QWEN2_VL_7B["text_config"][name] for name in SIZES}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def milliseconds(fn, device, repeats):
    """Mean wall time of `repeats` calls after one more, synchronised."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats * 1000


def differing(eager, compiled):
    """Share of elements that differ, over a tensor or a tuple of them."""
    pairs = list(zip(eager, compiled)) if isinstance(eager, tuple) else [(eager, compiled)]
    return sum(int((a != b).sum()) for a, b in pairs) / sum(a.numel() for a, _ in pairs)


def pieces(layer, rotary, tokens, sizes, device, repeats):
    """(name, eager ms, compiled ms, differing) of each elementwise piece alone."""
    dtype, heads, kv_heads = torch.bfloat16, sizes["num_attention_heads"], sizes["num_key_value_heads"]
    head_dim = sizes["hidden_size"] // heads
    hidden = torch.randn(1, tokens, sizes["hidden_size"], device=device, dtype=dtype)
    gate, up = (torch.randn(1, tokens, sizes["intermediate_size"], device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, tokens, head_dim, device=device, dtype=dtype)
    cos, sin = rotary(hidden, torch.arange(tokens, device=device)[None])
    work = {"RMSNorm": lambda: layer.input_layernorm(hidden), "SiLU(gate) x up": lambda: F.silu(gate) * up,
            "rotary q, k": lambda: modeling_qwen2.apply_rotary_pos_emb(q, k, cos, sin)}
    rows = []
    for name, fn in work.items():
        compiled = torch.compile(fn, dynamic=False)
        rows.append((name, milliseconds(fn, device, repeats), milliseconds(compiled, device, repeats),
                     differing(fn(), compiled())))
    return rows


def layers(model, shapes, device, repeats):
    """(shape, eager ms, first compiled call s, compiled ms, differing, largest difference) per shape."""
    inputs = {shape: torch.randn(*shape, model.config.hidden_size, device=device, dtype=model.dtype)
              for shape in shapes}
    run = {shape: (lambda x=x: model.model(inputs_embeds=x, use_cache=False).last_hidden_state)
           for shape, x in inputs.items()}
    eager = {shape: (fn(), milliseconds(fn, device, repeats)) for shape, fn in run.items()}
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._inductor.config.emulate_precision_casts = True
    for layer in model.model.layers:
        layer.compile()
    rows = []
    for shape, fn in run.items():
        start = time.perf_counter()
        out = fn()
        sync(device)
        first = time.perf_counter() - start
        reference, eager_ms = eager[shape]
        rows.append((shape, eager_ms, first, milliseconds(fn, device, repeats), differing(reference, out),
                     float((out.float() - reference.float()).abs().max())))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="tokens of the pieces' inputs")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers in the stack")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    sizes = TINY if args.smoke else QWEN2_7B
    tokens = 256 if args.smoke else args.tokens
    prefill = [(2, 64), (3, 48)] if args.smoke else [(16, 4096), (24, 2600), (32, 1900)]
    decode = [(4, 1), (3, 1)] if args.smoke else [(128, 1), (96, 1)]
    torch.manual_seed(0)
    config = Qwen2Config(**sizes, num_hidden_layers=args.layers, vocab_size=1000, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(device, torch.bfloat16).eval()
    rotary = modeling_qwen2.Qwen2RotaryEmbedding(config).to(device)
    with torch.no_grad():
        piece_rows = pieces(model.model.layers[0], rotary, tokens, sizes, device, args.repeats)
        layer_rows = layers(model, prefill + decode, device, args.repeats)
    print(f"{'piece, ' + str(tokens) + ' tokens':32s} {'eager ms':>9s} {'compiled ms':>12s} {'differing':>10s}")
    for name, eager_ms, compiled_ms, share in piece_rows:
        print(f"{name:32s} {eager_ms:9.2f} {compiled_ms:12.2f} {share:10.2e}")
    print(f"\n{str(args.layers) + ' layers, rows x tokens':24s} {'eager ms':>9s} {'1st call s':>10s} "
          f"{'compiled ms':>12s} {'speed-up':>9s} {'differing':>10s} {'max |diff|':>10s}")
    for shape, eager_ms, first, compiled_ms, share, largest in layer_rows:
        print(f"{str(shape):24s} {eager_ms:9.2f} {first:10.1f} {compiled_ms:12.2f} {eager_ms / compiled_ms:8.3f}x "
              f"{share:10.2e} {largest:10.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "pieces": piece_rows, "layers": layer_rows}, f, indent=1)


if __name__ == "__main__":
    main()
