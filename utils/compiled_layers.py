"""The language model's decoder layers compiled with torch.compile, so that their elementwise work runs fused.

Between its matrix products, a transformers decoder layer runs its RMSNorms (in float32), the rotary embedding and
the gated activation as chains of separate elementwise kernels, each reading and writing whole activations. On an
H100, a Qwen2-7B-sized layer over 65,536 tokens spent 18% of its time in them (bench/RESULTS.md, run 52): 3.6 ms per
RMSNorm, 3.5 ms for the rotary embedding; compiled, 0.35 and 0.40 ms. The matrix products and the attention stay
the kernels they were (cuBLAS and SDPA, called from the compiled code).

The numbers stay those of the eager layer: inductor rounds each intermediate to the model's dtype where eager
PyTorch rounds it (`emulate_precision_casts`); what can still differ is the order of a reduction (the RMSNorm's
mean). The GPU tests compare the captions of compiled layers and CUDA graphs with those of plain eager generate()
in float32 (tests/test_cuda_graphs.py).

One compiled code serves every layer of the model (`layer_idx` is not specialised). The first batch compiles its
shapes; a batch of other shapes compiles once more with dynamic sizes; decode steps (one token per row) compile
once more. That takes seconds at the start of a run, then nothing.
"""
import torch
from transformers import GenerationMixin

RECOMPILE_LIMIT = 64  # prefill and decode, with and without a padding mask, the refill loop: far fewer than this


def compile_decoder_layers(model):
    """Compile the decoder layers of every generating (sub)module of `model`; returns how many."""
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._inductor.config.emulate_precision_casts = True
    layers = dict.fromkeys(layer for module in model.modules() if isinstance(module, GenerationMixin)
                           for layer in module.get_decoder().layers)
    for layer in layers:
        for name, child in layer.named_children():
            if name != "self_attn":  # it writes the KV cache, whose per-layer state would recompile per layer
                child.compile()
    return len(layers)
