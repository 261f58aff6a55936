"""The RMSNorms and MLPs of a model compiled with torch.compile for the prefill; decode steps stay eager.

In a prefill over a batch's whole prompts (InternVL2-8B at batch 128: about 240,000 tokens), transformers' RMSNorm
runs as six elementwise kernels over float32 copies of the activations, a gated MLP's SiLU and product as two more,
QuickGELU (CLIP's and Qwen2-VL's vision towers) as three, each reading and writing whole activations. Compiled,
each becomes one fused kernel between the unchanged matrix products, which makes the prefill, and the scripts,
faster (see bench/RESULTS.md).

Decode steps (one token per row) run the eager forward: CUDA graphs replay them (utils/generation/cuda_graphs.py),
and compiled code was slower there. Compiled code is shared by every module of a class, with dynamic sizes. A
model's own forward stand-ins can have a compiled part of theirs too (`run_compiled`; qwen.VisionAttention's
rotary embedding), which compile_prefill turns on.

Compiling takes seconds per module class, tens of seconds with an empty inductor cache. By default it runs on a
background thread, from an example input shaped like the first one, while the calls go on with the eager forward;
once the code is ready they use it. `wait_for_compiles` waits for that thread: the loop starts the compiles with a
blank image and waits before its first batch (utils/caption_loop.py). The processes of a node share inductor's
cache folder (`compile_turn`): one compiles a function while the others wait, and then they all load its kernels
from the cache at once, instead of compiling the same graphs side by side or loading them one after another.
While a compile runs, decode steps are not recorded as CUDA graphs (COMPILING).
`wait=True` compiles at the first call instead, as torch.compile does.

Fused kernels round differently from the eager chain: bfloat16 activations differ in their last bits, as they do
between batch sizes. In float32 the GPU tests require the tokens of eager generate() (tests/test_cuda_graphs.py,
tokens_of_all_paths in tests/conftest.py). `eager_forwards` undoes `compile_prefill`.
"""
import contextlib
import fcntl
import functools
import hashlib
import os
import queue
import sys
import threading
from collections import Counter

import torch

PREFILL_CALLS = Counter()  # "compiled", "eager": prefill calls of the wrapped modules, by the code they ran
# Held while a compile runs: inductor synchronizes the device as it tunes kernels, which a CUDA graph being
# recorded on another thread does not survive (the recording and the compile both fail). Recordings do not wait
# for it: utils/generation/cuda_graphs.py decodes eagerly until it is free.
COMPILING = threading.Lock()


class CompiledForward:
    """One compiled code per function (a module class's forward), shared by all its modules and by later
    compile_prefill calls on the same model, so that these find it compiled."""

    def __init__(self, forward):
        self.function = forward
        self.code = torch.compile(forward, dynamic=True)
        self.ready = threading.Event()
        self.started = False

    def compile_in_background(self, *args):
        """Compile for arguments like `args` on the compile thread, once: tensors stand in with sizes of 2 but
        their last, their other arguments as they are."""
        if self.started:
            return
        self.started = True
        example = [example_like(arg) if isinstance(arg, torch.Tensor) else arg for arg in args]
        modes = torch.is_grad_enabled(), torch.is_inference_mode_enabled()  # compiled code is kept per mode
        compile_thread().put(functools.partial(self.compile, example, modes))

    def compile(self, example, modes):
        grad, inference = modes
        try:
            with (compile_turn(graphs_key(self.function, example, modes)), COMPILING, torch.inference_mode(inference),
                  torch.set_grad_enabled(grad)):
                self.code(*example)
                if any(isinstance(arg, torch.Tensor) and arg.is_cuda for arg in example):
                    torch.cuda.current_stream().synchronize()
        except Exception as error:  # noqa: BLE001  (the eager forward goes on serving the prefill)
            print(f"torch.compile failed, the prefill stays eager: {type(error).__name__}: {error}".splitlines()[0],
                  file=sys.stderr, flush=True)
            return
        self.ready.set()


def example_like(tensor):
    """A tensor of ones like `tensor`, its sizes but the last unbacked: code for every size (64-bit indexing too),
    not only for ones like it. Ones, not random: the compile thread must not draw from the generator that the
    captioner's sampling draws from."""
    example = torch.ones([2] * (tensor.dim() - 1) + list(tensor.shape[-1:]), dtype=tensor.dtype,
                         device=tensor.device)
    for dimension in range(tensor.dim() - 1):
        torch._dynamo.decorators.mark_unbacked(example, dimension)
    return example


@functools.cache
def compiled(forward):
    return CompiledForward(forward)


@functools.cache
def compile_thread():
    """The queue of the thread that compiles, one graph at a time. A daemon: a process that ends (its work done, or
    stopped by a signal) does not wait for a compile still under way."""
    jobs = queue.SimpleQueue()
    # In torch 2.11 "FX is tracing" is one flag for the process (2.14 keeps one per thread): while this thread
    # traces a graph, the main thread's call of code already compiled raises ("using FX to symbolically trace a
    # dynamo-optimized function"). With this off, that call runs the function eagerly: the same computation.
    torch._dynamo.config.error_on_nested_fx_trace = False

    def work():
        while True:
            jobs.get()()
    threading.Thread(target=work, name="compile", daemon=True).start()
    return jobs


def wait_for_compiles():
    """Return once the compile thread has finished every compile started so far."""
    done = threading.Event()
    compile_thread().put(done.set)
    done.wait()


def graphs_key(function, example, modes):
    """Names the graphs that compiling `function` for `example` makes: the function, torch's version, the modes and
    every argument (tensors by dtype, device and sizes, functions by name, modules by their repr)."""
    def described(arg):
        if isinstance(arg, torch.Tensor):
            return str(arg.dtype), arg.device.type, tuple(arg.shape)
        return f"{arg.__module__}.{arg.__qualname__}" if hasattr(arg, "__qualname__") else repr(arg)
    parts = repr((torch.__version__, modes, [described(arg) for arg in example]))
    return f"{function.__qualname__}-{hashlib.sha256(parts.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def compile_turn(key):
    """Held while compiling the graphs `key` names. A marker in inductor's cache folder says that a process of the
    machine (or of the nodes sharing the folder) compiled them: then the kernels are in the cache and this process
    loads them without waiting for the others. Without one it takes the folder's lock, so that one process compiles
    at a time, and once it holds the lock looks again: the process before it may have compiled the same graphs."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f"compiled-{key}")
    with open(os.path.join(folder, "compile.lock"), "a") as lock:  # closing it releases the lock
        if not os.path.exists(marker):
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(marker):
                fcntl.flock(lock, fcntl.LOCK_UN)
        yield
        open(marker, "a").close()


def run_compiled(function, args, wait):
    """function(*args) by its compiled code once that is ready (or at once, `wait`); until then eagerly, the
    compile started in the background."""
    code = compiled(function)
    if wait or code.ready.is_set():
        PREFILL_CALLS["compiled"] += 1
        return code.code(*args)
    code.compile_in_background(*args)
    PREFILL_CALLS["eager"] += 1
    return function(*args)


class PrefillForward:
    """Stands in for a module's forward: compiled code (run_compiled) when the rows hold more than one token,
    eager otherwise."""

    def __init__(self, module, wait):
        self.module, self.forward, self.wait = module, type(module).forward, wait

    def __call__(self, hidden_states):
        if hidden_states.shape[-2] > 1:
            return run_compiled(self.forward, (self.module, hidden_states), self.wait)
        return self.forward(self.module, hidden_states)


def compile_prefill(model, wait=False):
    """Give every RMSNorm and every module named `mlp` in `model` a PrefillForward, and turn on the compiled part
    of every forward stand-in that has one (a `compile_wait` attribute: None, eager; else run_compiled's `wait`;
    qwen.VisionAttention); returns how many modules."""
    torch._inductor.config.emulate_precision_casts = True  # round intermediates to bfloat16 where eager does
    modules = [module for name, module in model.named_modules()
               if type(module).__name__.endswith("RMSNorm") or name.rpartition(".")[2] == "mlp"]
    for module in modules:  # (a module done before gets this call's `wait`: the forward wrapped is its class's)
        module.forward = PrefillForward(module, wait)
    stand_ins = [forward for forward in own_forwards(model) if hasattr(forward, "compile_wait")]
    for forward in stand_ins:
        forward.compile_wait = wait
    return len(modules) + len(stand_ins)


def own_forwards(model):
    return [module.__dict__["forward"] for module in model.modules() if "forward" in module.__dict__]


def eager_forwards(model):
    """Undo compile_prefill."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), PrefillForward):
            del module.forward
    for forward in own_forwards(model):
        if hasattr(forward, "compile_wait"):
            forward.compile_wait = None
