"""The RMSNorms and MLPs of a model compiled with torch.compile for the prefill; decode steps stay eager.

In a prefill over a batch's whole prompts (InternVL2-8B at batch 128: about 240,000 tokens), transformers' RMSNorm
runs as six elementwise kernels over float32 copies of the activations, a gated MLP's SiLU and product as two more,
QuickGELU (CLIP's and Qwen2-VL's vision towers) as three, each reading and writing whole activations. Compiled,
each becomes one fused kernel between the unchanged matrix products, which makes the prefill, and the scripts,
faster (see bench/RESULTS.md).

Decode steps (one token per row) run the eager forward: CUDA graphs replay them (utils/generation/cuda_graphs.py),
and compiled code was slower there. Compiled code is shared by every module of a class, with dynamic sizes, so a
process compiles a few times in its first batches (faster with inductor's on-disk cache) and then never again.

Fused kernels round differently from the eager chain: bfloat16 activations differ in their last bits, as they do
between batch sizes. In float32 the GPU tests require the tokens of eager generate() (tests/test_cuda_graphs.py,
tokens_of_all_paths in tests/conftest.py). `eager_forwards` undoes `compile_prefill`.
"""
import functools

import torch


@functools.cache
def compiled(forward):
    """One compiled code per forward function (per module class), shared by all its modules and by later
    compile_prefill calls on the same model, so that these find it compiled."""
    return torch.compile(forward, dynamic=True)


class PrefillForward:
    """Stands in for a module's forward: compiled code when the rows hold more than one token, eager otherwise."""

    def __init__(self, module):
        self.module, self.forward = module, type(module).forward

    def __call__(self, hidden_states):
        if hidden_states.shape[-2] > 1:
            return compiled(self.forward)(self.module, hidden_states)
        return self.forward(self.module, hidden_states)


def compile_prefill(model):
    """Give every RMSNorm and every module named `mlp` in `model` a PrefillForward; returns how many modules."""
    torch._inductor.config.emulate_precision_casts = True  # round intermediates to bfloat16 where eager does
    modules = [module for name, module in model.named_modules()
               if type(module).__name__.endswith("RMSNorm") or name.rpartition(".")[2] == "mlp"]
    for module in modules:
        if not isinstance(module.forward, PrefillForward):  # not already done
            module.forward = PrefillForward(module)
    return len(modules)


def eager_forwards(model):
    """Undo compile_prefill."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), PrefillForward):
            del module.forward
