"""The RMSNorms and MLPs of a model compiled with torch.compile for the prefill; decode steps stay eager.

In a prefill over a batch's whole prompts (InternVL2-8B at batch 128: about 240,000 tokens), transformers' RMSNorm
runs as six elementwise kernels over float32 copies of the activations, a gated MLP's SiLU and product as two more,
QuickGELU (CLIP's and Qwen2-VL's vision towers) as three, each reading and writing whole activations. Compiled,
each becomes one fused kernel between the unchanged matrix products, which makes the prefill, and the scripts,
faster (see bench/RESULTS.md).

Decode steps (one token per row) run the eager forward: CUDA graphs replay them (utils/generation/cuda_graphs.py),
and compiled code was slower there. Compiled code is shared by every module of a class, with dynamic sizes.

Compiling takes seconds per module class, tens of seconds with an empty inductor cache. By default it runs on a
background thread, from an example input shaped like the first one, while the prefill runs the eager forward, so
the GPU never waits for it; once the code is ready the prefill uses it. The processes of a node take turns
(a file lock in inductor's cache folder): the first compiles, the others then load its kernels from the cache
instead of compiling the same graphs at once. `wait=True` compiles at the first call instead, as torch.compile
does; then which batches ran compiled does not depend on how fast the compile went.

Fused kernels round differently from the eager chain: bfloat16 activations differ in their last bits, as they do
between batch sizes. In float32 the GPU tests require the tokens of eager generate() (tests/test_cuda_graphs.py,
tokens_of_all_paths in tests/conftest.py). `eager_forwards` undoes `compile_prefill`.
"""
import contextlib
import fcntl
import functools
import os
import queue
import sys
import threading
from collections import Counter

import torch

PREFILL_CALLS = Counter()  # "compiled", "eager": prefill calls of the wrapped modules, by the code they ran


class CompiledForward:
    """One compiled code per forward function (per module class), shared by all its modules and by later
    compile_prefill calls on the same model, so that these find it compiled."""

    def __init__(self, forward):
        self.code = torch.compile(forward, dynamic=True)
        self.ready = threading.Event()
        self.started = False

    def compile_in_background(self, module, hidden_states):
        """Compile for inputs like `hidden_states` on the compile thread, once."""
        if self.started:
            return
        self.started = True
        shape = [2] * (hidden_states.dim() - 1) + [hidden_states.shape[-1]]
        example = torch.randn(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        # sizes without a value to specialize on: code for every size (64-bit indexing), not only ones like it
        for dimension in range(hidden_states.dim() - 1):
            torch._dynamo.decorators.mark_unbacked(example, dimension)
        modes = torch.is_grad_enabled(), torch.is_inference_mode_enabled()  # compiled code is kept per mode
        compile_thread().put(functools.partial(self.compile, module, example, modes))

    def compile(self, module, example, modes):
        grad, inference = modes
        try:
            with node_lock(), torch.inference_mode(inference), torch.set_grad_enabled(grad):
                self.code(module, example)
                if example.is_cuda:
                    torch.cuda.current_stream(example.device).synchronize()
        except Exception as error:  # noqa: BLE001  (the eager forward goes on serving the prefill)
            print(f"torch.compile failed, the prefill stays eager: {type(error).__name__}: {error}".splitlines()[0],
                  file=sys.stderr, flush=True)
            return
        self.ready.set()


@functools.cache
def compiled(forward):
    return CompiledForward(forward)


@functools.cache
def compile_thread():
    """The queue of the thread that compiles, one graph at a time. A daemon: a process that ends (its work done, or
    stopped by a signal) does not wait for a compile still under way."""
    jobs = queue.SimpleQueue()

    def work():
        while True:
            jobs.get()()
    threading.Thread(target=work, name="compile", daemon=True).start()
    return jobs


@contextlib.contextmanager
def node_lock():
    """Held while compiling: one process of the machine (or of the nodes sharing the cache folder) at a time."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), "compile.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class PrefillForward:
    """Stands in for a module's forward: compiled code when the rows hold more than one token and the code is ready
    (or `wait`), eager otherwise."""

    def __init__(self, module, wait):
        self.module, self.forward, self.wait = module, type(module).forward, wait

    def __call__(self, hidden_states):
        if hidden_states.shape[-2] > 1:
            code = compiled(self.forward)
            if self.wait or code.ready.is_set():
                PREFILL_CALLS["compiled"] += 1
                return code.code(self.module, hidden_states)
            code.compile_in_background(self.module, hidden_states)
            PREFILL_CALLS["eager"] += 1
        return self.forward(self.module, hidden_states)


def compile_prefill(model, wait=False):
    """Give every RMSNorm and every module named `mlp` in `model` a PrefillForward; returns how many modules."""
    torch._inductor.config.emulate_precision_casts = True  # round intermediates to bfloat16 where eager does
    modules = [module for name, module in model.named_modules()
               if type(module).__name__.endswith("RMSNorm") or name.rpartition(".")[2] == "mlp"]
    for module in modules:  # (a module done before gets this call's `wait`: the forward wrapped is its class's)
        module.forward = PrefillForward(module, wait)
    return len(modules)


def eager_forwards(model):
    """Undo compile_prefill."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), PrefillForward):
            del module.forward
