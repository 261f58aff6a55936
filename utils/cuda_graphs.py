"""Decode steps of `generate()` replayed as CUDA graphs.

Between two tokens, transformers' generate loop runs the model's forward eagerly: about a thousand
small kernels per step for a 7B model, each launched from Python. On an H100 with Qwen2-VL-7B at batch
256 the GPU was busy 16 ms of each 78 ms step (bench/RESULTS.md): decoding waited on the CPU. A CUDA
graph records the kernels of one decode step once and then replays them with a single launch.

A graph needs fixed shapes and fixed memory, so generate() runs with transformers' static KV cache
(allocated for the batch, written in place), and each step's inputs are copied into the tensors the
graph was recorded with. A caller that brings its own cache (utils/shared_prefix.py: a prefix prefilled
beforehand) brings a StaticCache; `uses_static_cache` tells it when. generate() asks the model for its
decode-step forward through `get_compiled_call` (its hook for torch.compile); answering there with a
graph leaves everything else to transformers (logits processors, stopping, padding), so the tokens are
those of plain generate().
The first decode step of each generate() call runs eagerly, the second is recorded, and the graph is
dropped when the call returns: nothing recorded outlives the batch (its cache, a model's per-batch
state such as Qwen2-VL's rope deltas). Prefill stays eager. A step that cannot be recorded (a model
whose forward reads a GPU value on the CPU) runs eagerly, with one warning.

Rows that have ended still cost a static batch a row of every decode step: with the five-prompt recipe, 39% of
the decode row-steps (bench/RESULTS.md), since a noun list ends after ~15 tokens and a detailed caption runs to
77. Once at most half of the rows the cache holds are still generating, and enough steps are left to repay a new
recording, the cache keeps only those rows (Cache.reorder_cache), each step runs on them alone (one eager step,
then a graph recorded for the smaller batch), and their logits go back into the rows of the whole batch; an ended
row's logits are zeros, and generate() gives it the pad token whatever they are. Which rows have ended, the step
learns from generate()'s own stopping criteria; where none of them is an end token's (nothing pads ended rows),
nothing is compacted. Each live row's arithmetic is that of the whole batch, so the tokens are plain generate()'s.
"""
import functools
import sys

import torch
from transformers import GenerationMixin, StoppingCriteriaList

COMPACT_AT = 0.5  # compact the cache once at most this share of its rows is still generating,
MIN_STEPS_LEFT = 24  # and this many decode steps are left to repay an eager step and a recording


def _tensors(value):
    """The tensors of one forward argument: a tensor, or a dict of them (transformers' mask mapping)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
        return list(value.values())
    return []


class DecodeStepGraph:
    """Stands in for the model's forward during the decode steps of one generate() call."""

    def __init__(self, model, unread_inputs=()):
        self.model = model
        self.unread_inputs = set(unread_inputs)
        self.recording_failed = False
        self.replays = self.compactions = 0  # over the whole run, for the summary line
        self.reset()

    def reset(self):
        self.graph = self.inputs = self.outputs = self.signature = None
        self.eager_next = True  # the first step, and the first after a compaction, also warm up the kernels
        self.finished = None  # (rows,) bool on the GPU: the rows generate()'s stopping criteria have ended
        self.kept = None  # after a compaction: the batch rows the cache still holds
        self.compacts = False  # whether generate() pads ended rows (an end-token criterion): only then compact

    def note_finished(self, is_done):
        self.finished = is_done if self.finished is None else self.finished | is_done

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
        if self.worth_compacting(kwargs["past_key_values"]):
            self.compact(kwargs["past_key_values"])
        if self.kept is None:
            return self.forward(kwargs)
        rows = len(self.finished)
        return self.expanded(self.forward({name: rows_of(name, value, self.kept, rows)
                                           for name, value in kwargs.items()}), rows)

    def forward(self, kwargs):
        if self.recording_failed or self.eager_next:
            self.eager_next = False
            return self.model(**kwargs)
        if self.graph is None:
            self.record(kwargs)
            if self.graph is None:
                return self.model(**kwargs)
        elif self.signature_of(kwargs) != self.signature:
            return self.model(**kwargs)  # not seen in generate(); kept correct rather than fast
        else:
            for name, value in kwargs.items():
                for static, new in zip(_tensors(self.inputs[name]), _tensors(value)):
                    static.copy_(new)
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def live_in_cache(self):
        """Which of the rows the cache holds are still generating: (held rows,) bool on the GPU."""
        return ~(self.finished if self.kept is None else self.finished[self.kept])

    def worth_compacting(self, cache):
        if not self.compacts or self.finished is None:
            return False
        live = self.live_in_cache()
        live_rows, filled = torch.stack([live.sum(), torch.as_tensor(cache.get_seq_length(), device=live.device)]).tolist()
        return live_rows <= COMPACT_AT * len(live) and cache.get_max_length() - filled >= MIN_STEPS_LEFT

    def compact(self, cache):
        """Keep only the live rows in the cache; the next step runs eagerly at the new size, the one after
        records a graph for it."""
        positions = self.live_in_cache().nonzero().flatten()
        cache.reorder_cache(positions)
        self.compactions += 1
        self.kept = positions if self.kept is None else self.kept[positions]
        self.graph = self.inputs = self.outputs = self.signature = None
        self.eager_next = True

    def expanded(self, outputs, rows):
        """The outputs of the kept rows as the whole batch's: their logits in their rows, zeros elsewhere."""
        logits = outputs.logits.new_zeros((rows, *outputs.logits.shape[1:]))
        logits[self.kept] = outputs.logits
        return type(outputs)(**{**outputs, "logits": logits})

    def record(self, kwargs):
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
            print(f"CUDA graphs: cannot record a decode step of {type(self.model).__name__} ({str(e).splitlines()[0]}); "
                  "decoding eagerly", file=sys.stderr, flush=True)
            return
        self.graph = graph


@functools.cache
def capture_stream():
    return torch.cuda.Stream()  # a capture needs a stream other than the default one


def capture(graph, forward):
    """Record forward() into graph and return its outputs; nothing runs, the cache is not touched. What
    torch.cuda.graph() does, less its emptying of the CUDA and pinned-memory caches first: at every batch that
    freed the loader's pinned memory (cudaFreeHost, 0.7 s in one gap, bench/RESULTS.md) and the memory the next
    batch then allocates again."""
    torch.cuda.synchronize()  # the eager work before the capture has finished
    with torch.cuda.stream(capture_stream()):
        graph.capture_begin()
        try:
            return forward()
        finally:
            graph.capture_end()


def rows_of(name, value, rows, batch):
    """The given rows of one decode-step argument of a `batch`-row generate(): tensors (and dicts of them) along
    their batch dimension, anything else, or a tensor without that dimension, as it is."""
    if isinstance(value, dict):
        return {key: rows_of(name, item, rows, batch) for key, item in value.items()}
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    dim = value.dim() - 2 if name == "position_ids" else 0  # (batch, length), or mrope's (3 or 4, batch, length)
    return value.index_select(dim, rows) if value.shape[dim] == batch else value


class ObservedStoppingCriteria(StoppingCriteriaList):
    """generate()'s stopping criteria, whose verdicts the decode step also gets (DecodeStepGraph.note_finished)."""

    def __init__(self, criteria, step):
        super().__init__(criteria)
        self.step = step
        step.compacts = any(hasattr(criterion, "eos_token_id") for criterion in criteria)

    def __call__(self, input_ids, scores, **kwargs):
        is_done = super().__call__(input_ids, scores, **kwargs)
        self.step.note_finished(is_done)
        return is_done


def _observed_stopping_criteria(get_stopping_criteria, step):
    @functools.wraps(get_stopping_criteria)
    def observed_stopping_criteria(*args, **kwargs):
        return ObservedStoppingCriteria(get_stopping_criteria(*args, **kwargs), step)
    return observed_stopping_criteria


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
                module.generate = _static_cache_generate(module.generate, module, step)
                module._get_stopping_criteria = _observed_stopping_criteria(module._get_stopping_criteria, step)
            steps.append(module._decode_step_graph)
    return steps


def uses_static_cache(model):
    """Whether generate() of `model` runs with a static KV cache (decode_with_cuda_graphs made it so): a cache that
    a caller passes to it must then be a StaticCache sized for the whole generation."""
    return "_decode_step_graph" in model.__dict__


def _static_cache_generate(generate, module, step):
    @functools.wraps(generate)
    def static_cache_generate(*args, **kwargs):
        if kwargs.get("num_beams", 1) != 1:
            return generate(*args, **kwargs)
        # Size the cache for this batch, not for the longest batch so far (transformers keeps the maximum).
        module.__dict__.pop("_previous_max_cache_length", None)
        step.reset()
        if "past_key_values" not in kwargs:  # a caller's own cache (utils/shared_prefix.py) is already static
            kwargs["cache_implementation"] = "static"
        try:
            return generate(*args, **kwargs)
        finally:
            step.reset()
    return static_cache_generate
