"""Named ranges and timers that bench/throughput.py puts around the captioning code, from outside it.

The benchmark does not edit the loop (utils/caption_loop.py and its stages) or the model scripts: it replaces a
method or a module's forward for the time of a measurement and puts the original back afterwards (`patched`).
Ranges are torch.profiler.record_function ranges named "bench: ...", which a profile shows on the CPU timeline; the
timeline analysis (bench/timeline.py) attributes time and GPU kernels to them.
"""
import contextlib
import functools
import time

import torch
from torch.profiler import record_function
from transformers import LogitsProcessorList, StoppingCriteriaList

from utils.generation import refill
from utils.generation.cuda_graphs import DecodeStepGraph

PREFIX = "bench: "
_MISSING = object()


@contextlib.contextmanager
def patched(owner, name, wrap):
    """owner.name replaced by wrap(owner.name) inside the block; what owner itself held is put back after."""
    own = vars(owner).get(name, _MISSING)
    setattr(owner, name, wrap(getattr(owner, name)))
    try:
        yield
    finally:
        if own is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


def in_range(label):
    """wrap for `patched`: every call runs inside the range "bench: <label>"."""
    def wrap(function):
        @functools.wraps(function)
        def ranged(*args, **kwargs):
            with record_function(PREFIX + label):
                return function(*args, **kwargs)
        return ranged
    return wrap


def timed(seconds, key, sync=None, calls=None):
    """wrap for `patched`: adds each call's wall time to seconds[key], and its (start, end) to the list `calls` if
    given; sync() (the GPU) before and after."""
    def wrap(function):
        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            if sync:
                sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if sync:
                    sync()
                seconds[key] += time.perf_counter() - start
                if calls is not None:
                    calls.append((start, time.perf_counter()))
        return timed_call
    return wrap


def prefill_or_decode(forward):
    """wrap for the generating model's forward: a call with several new positions is the prefill, one with a
    single position a decode step run eagerly (the first of each generate(), or every step without graphs)."""
    @functools.wraps(forward)
    def ranged(*args, **kwargs):
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        label = "LLM prefill" if inputs is not None and inputs.shape[1] > 1 else "decode: eager forward"
        with record_function(PREFIX + label):
            return forward(*args, **kwargs)
    return ranged


@contextlib.contextmanager
def marked_regions(model, generating, parts):
    """Ranges around the model's parts ({label: dotted submodule path from `model`}), the generating module's
    prefill and eager decode forwards, CUDA graph recording, logits processors, stopping criteria and the pieces
    of utils/generation/refill.py's loop."""
    with contextlib.ExitStack() as stack:
        for label, path in parts.items():
            stack.enter_context(patched(model.get_submodule(path), "forward", in_range(label)))
        stack.enter_context(patched(generating, "forward", prefill_or_decode))
        stack.enter_context(patched(DecodeStepGraph, "record", in_range("decode: record CUDA graph")))
        stack.enter_context(patched(LogitsProcessorList, "__call__", in_range("decode: logits processors")))
        stack.enter_context(patched(StoppingCriteriaList, "__call__", in_range("decode: stopping criteria")))
        stack.enter_context(patched(refill.RefillDecoder, "admit", in_range("refill: rows join (prefill, place)")))
        stack.enter_context(patched(refill.Slots, "step", in_range("refill: decode step")))
        stack.enter_context(patched(refill.RefillDecoder, "choose", in_range("refill: choose tokens")))
        stack.enter_context(patched(refill.RefillDecoder, "record", in_range("refill: tokens to the CPU")))
        yield


@contextlib.contextmanager
def loader_wait(seconds):
    """seconds["loader_wait"] += the time in the DataLoader's __next__: waiting for its worker processes' prepared
    images (and unpickling them). The loop's batcher thread (utils/batcher.py) waits there, while the GPU may
    still run a batch: only the main thread's wait for the batcher idles the GPU (a profile's "loop, outside
    caption()")."""
    seconds.setdefault("loader_wait", 0.0)
    with patched(torch.utils.data.dataloader._BaseDataLoaderIter, "__next__", timed(seconds, "loader_wait")):
        yield
