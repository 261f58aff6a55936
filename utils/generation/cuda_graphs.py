"""Decode steps of `generate()` replayed as CUDA graphs.

Between two tokens, transformers' generate loop runs the model's forward eagerly: about a thousand small kernels per
step for a 7B model, each launched from Python, so the GPU waits on the CPU (see bench/RESULTS.md). A CUDA graph
records the kernels of one decode step once, then replays them with a single launch.

A graph needs fixed shapes and fixed memory, so generate() runs with transformers' static KV cache (allocated for
the batch, written in place), and each step's inputs are copied into the tensors the graph was recorded with.
generate() asks the model for its decode-step forward through `get_compiled_call` (its hook for torch.compile);
answering there with a graph leaves everything else to transformers (logits processors, stopping, padding), so the
tokens are those of plain generate(). generate() also reads its "have all rows ended?" flag one step late
(transformers' DeferredStopCheck, which transformers turns on only on Apple GPUs), so that the CPU does not wait
for each step to end before it launches the next; generate() undoes the extra step itself.

The first decode step with a new static cache runs eagerly (it warms up the kernels for the new shapes), the second
is recorded. The cache outlives the call with its recording: the next call of the same shape (rows and cache
length: every full batch of LLaVA-1.5 and MiniGPT-4, whose prompts have one length) empties that cache and replays
from its first decode step; a call of another shape frees both first. This holds because a decode step reads only
its inputs (generate() passes the position ids, also Qwen2-VL's), the cache and the weights. A caller that brings
its own cache (utils/generation/shared_prefix.py: a prefix prefilled beforehand) brings a StaticCache
(`uses_static_cache` says when), recorded for that call alone. Prefill stays eager. A step that cannot be recorded
(a forward that reads a GPU value on the CPU) runs eagerly, with one warning; so do steps while a compile runs
on another thread (utils/generation/compiled_prefill.py), until a later step records. `eager_decoding` undoes
`decode_with_cuda_graphs`.
"""
import contextlib
import functools
import sys

import torch
from transformers import GenerationMixin
from transformers.generation import utils as generation_utils
from transformers.generation.utils import DeferredStopCheck

from utils.generation.compiled_prefill import COMPILING


def _tensors(value):
    """The tensors of one forward argument: a tensor, or a dict of them (transformers' mask mapping)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
        return list(value.values())
    return []


class DecodeStepGraph:
    """Stands in for the model's forward during the decode steps of generate() calls."""

    def __init__(self, model, unread_inputs=()):
        self.model = model
        self.unread_inputs = set(unread_inputs)
        self.recording_failed = False
        self.replays = 0  # over the whole run, for the summary line
        self.reset()

    def reset(self):
        """Drop the recording and the static cache it was recorded with (their memory is freed)."""
        self.graph = self.inputs = self.outputs = self.signature = None
        self.cache = self.cache_shape = None
        self.steps = 0

    def static_cache(self, shape, make):
        """generate()'s static cache for a batch of `shape` (rows, columns): the one of the last call, emptied, when
        its shape is the same, so that the graph recorded with it replays from the first step; else a new one
        (make()), the old cache and its graph freed first."""
        if self.cache is not None and self.cache_shape == shape:
            self.cache.reset()
            return self.cache
        self.reset()
        self.cache, self.cache_shape = make(), shape
        return self.cache

    @contextlib.contextmanager
    def for_one_call(self):
        """A recording of its own for one generate() call (or utils/generation/refill.py's decode loop), dropped when
        the call ends: nothing recorded outlives the batch."""
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    @staticmethod
    def signature_of(kwargs):
        """What must not change between replays: tensor shapes and dtypes, and every other argument."""
        parts = []
        for name, value in sorted(kwargs.items()):
            tensors = _tensors(value)
            if tensors:
                parts.append((name, tuple((t.shape, t.dtype, t.device) for t in tensors)))
            else:
                parts.append((name, id(value) if isinstance(value, torch.nn.Module) or hasattr(value, "update")
                              else repr(value)))
        return tuple(parts)

    def __call__(self, **kwargs):
        kwargs = {name: value for name, value in kwargs.items() if name not in self.unread_inputs}
        self.steps += 1
        if self.graph is not None and self.signature_of(kwargs) == self.signature:
            for name, value in kwargs.items():
                for static, new in zip(_tensors(self.inputs[name]), _tensors(value)):
                    static.copy_(new)
        elif self.recording_failed or self.graph is not None or self.steps == 1:
            # the first step with a new cache also warms up the kernels; a step unlike the recorded one is not
            # seen in generate(): kept correct rather than fast
            return self.model(**kwargs)
        else:
            self.record(kwargs)
            if self.graph is None:
                return self.model(**kwargs)
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def record(self, kwargs):
        if not COMPILING.acquire(blocking=False):
            return  # a compile is under way (see COMPILING): this step runs eagerly, a later one records
        try:
            self.record_now(kwargs)
        finally:
            COMPILING.release()

    def record_now(self, kwargs):
        self.signature = self.signature_of(kwargs)
        self.inputs = {name: ({k: v.clone() for k, v in value.items()} if isinstance(value, dict) and _tensors(value)
                              else value.clone() if isinstance(value, torch.Tensor) else value)
                       for name, value in kwargs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            self.outputs = capture(graph, functools.partial(self.model, **self.inputs))
        except torch.cuda.OutOfMemoryError:
            self.reset()
            raise
        except RuntimeError as e:
            while e.__context__ is not None:  # the first error, not the failed end of the recording
                e = e.__context__
            self.recording_failed = True
            self.reset()
            print(f"CUDA graphs: cannot record a decode step of {type(self.model).__name__} "
                  f"({str(e).splitlines()[0]}); decoding eagerly", file=sys.stderr, flush=True)
            return
        self.graph = graph


@functools.cache
def capture_stream():
    return torch.cuda.Stream()  # a capture needs a stream other than the default one


def capture(graph, forward):
    """Record forward() into graph and return its outputs; nothing runs, the cache is not touched. What
    torch.cuda.graph() does, less its emptying of the CUDA and pinned-memory caches first: at every batch that
    freed the loader's pinned memory (a long cudaFreeHost while the GPU idled, see bench/RESULTS.md) and the memory
    the next batch then allocates again. Only this thread's CUDA calls are restricted while it records
    ("thread_local"): the loader's pinning thread allocates pinned memory meanwhile (the batcher thread keeps it
    busy while the GPU runs a batch), which in the default "global" mode breaks the recording and that thread, and
    once hung a run."""
    torch.cuda.synchronize()  # the eager work before the capture has finished
    with torch.cuda.stream(capture_stream()):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            return forward()
        finally:
            graph.capture_end()


def decode_with_cuda_graphs(model, unread_inputs=()):
    """Make every generate() of `model` (and of its submodules) decode through CUDA graphs; returns their
    DecodeStepGraph objects. unread_inputs: generate() kwargs that a decode step does not read but that
    grow at every step (a graph needs fixed shapes); they are left out of decode steps. Beam search is left
    as it is: it reorders the cache between steps."""
    steps = []
    for module in model.modules():
        if isinstance(module, GenerationMixin):
            if "_decode_step_graph" not in module.__dict__:  # not already done
                module._decode_step_graph = step = DecodeStepGraph(module, unread_inputs)
                module.get_compiled_call = lambda compile_config=None, step=step: step
                module._prepare_static_cache = functools.partial(_kept_static_cache, module._prepare_static_cache, step)
                module.generate = _static_cache_generate(module.generate, module, step)
            steps.append(module._decode_step_graph)
    return steps


# what decode_with_cuda_graphs sets on each generating module besides its DecodeStepGraph, and what generate()
# then notes there (the length of its static caches)
_PATCHED = ("get_compiled_call", "_prepare_static_cache", "generate", "_previous_max_cache_length")


def eager_decoding(model):
    """Undo decode_with_cuda_graphs: every generate() of `model` (and of its submodules) decodes eagerly again, with
    transformers' own cache; the recordings and the caches kept with them are freed."""
    for module in model.modules():
        step = module.__dict__.pop("_decode_step_graph", None)
        if step is not None:
            step.reset()
            for name in _PATCHED:
                module.__dict__.pop(name, None)


def uses_static_cache(model):
    """Whether generate() of `model` runs with a static KV cache (decode_with_cuda_graphs made it so): a cache that
    a caller passes to it must then be a StaticCache sized for the whole generation."""
    return "_decode_step_graph" in model.__dict__


def decode_step_graph(model):
    """The DecodeStepGraph of `model` for a decode loop of its own (utils/generation/refill.py), whose inputs and
    cache then stay at fixed addresses: where decode_with_cuda_graphs made one and the model is on a GPU, else None."""
    return model.__dict__.get("_decode_step_graph") if model.device.type == "cuda" else None


class StopCheckOneStepLate(DeferredStopCheck):
    """transformers' DeferredStopCheck on CUDA too: the flag is copied without waiting and read at the next step (it
    needs device events: none on the CPU). Its conditions otherwise as transformers states them (5.17): not for
    assisted generation, and a cache that generate() returns to its caller must be able to drop the extra step (a
    StaticCache cannot: then no deferral)."""

    @staticmethod
    def is_supported(device, cache, cache_is_returned, is_assistant):
        return (device.type in ("cuda", "mps") and not is_assistant
                and (cache is None or cache.is_croppable or not cache_is_returned))


@contextlib.contextmanager
def stop_check_one_step_late():
    """generate() calls within read their stop flag one step late (generate() picks its stop check by this name)."""
    generation_utils.DeferredStopCheck = StopCheckOneStepLate
    try:
        yield
    finally:
        generation_utils.DeferredStopCheck = DeferredStopCheck


def _static_cache_generate(generate, module, step):
    @functools.wraps(generate)
    def static_cache_generate(*args, **kwargs):
        if kwargs.get("num_beams", 1) != 1:
            return generate(*args, **kwargs)
        # Size the cache for this batch, not for the longest batch so far (transformers keeps the maximum).
        module.__dict__.pop("_previous_max_cache_length", None)
        if "past_key_values" in kwargs:  # a caller's own cache (utils/generation/shared_prefix.py): for this call
            recording = step.for_one_call()
        else:  # generate()'s cache, kept with its recording for the next call of the same shape
            kwargs["cache_implementation"] = "static"
            recording = contextlib.nullcontext()
        with recording, stop_check_one_step_late():
            return generate(*args, **kwargs)
    return static_cache_generate


def _kept_static_cache(prepare, step, *, batch_size, max_cache_len, **kwargs):
    """Stands in for generate()'s _prepare_static_cache: the cache the model's DecodeStepGraph keeps."""
    return step.static_cache((batch_size, max_cache_len),
                             functools.partial(prepare, batch_size=batch_size, max_cache_len=max_cache_len, **kwargs))
