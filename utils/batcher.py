"""The batcher: read-ahead windows of prepared images -> batches, each with its CPU inputs, made on a second thread.

While the GPU captions one batch, the loop's second thread waits for the image workers, sorts their window,
forms the next batches and runs each one's CPU work (a captioner's optional `inputs()`: token ids, masks,
positions). So the GPU does not idle between batches while the main process does that work: with Qwen2-VL at
batch 256 it was 0.2-0.3 s a batch (bench/RESULTS.md runs 47 and 49).
"""
import queue
import threading
from typing import Any, NamedTuple


class Batch(NamedTuple):
    items: list  # [(index into the pending images, prepared image)]
    prompt_keys: list  # the prompts that some image of the batch still misses
    inputs: Any = None  # the captioner's inputs(images, prompts), or None: it has none, or they are made later


class Batcher:
    """Forms the batches of each window: its good images sorted by the captioner's cost (similar lengths in one
    batch: less padding), in batches of `batch_size`, read when each batch is formed (the loop lowers it after
    an out-of-memory retry)."""

    def __init__(self, captioner, prompts, pending, batch_size):
        self.captioner, self.prompts, self.pending, self.batch_size = captioner, prompts, pending, batch_size

    def pieces(self, windows):
        """For each window: the list of its unreadable images' (index, error), then its Batches."""
        for window in windows:
            yield [(index, error) for index, _, error in window if error]
            good = [(index, prepared) for index, prepared, error in window if error is None]
            if hasattr(self.captioner, "cost"):
                good.sort(key=lambda item: self.captioner.cost(item[1]))
            start = 0
            while start < len(good):
                size = self.batch_size
                yield self.batch(good[start:start + size])
                start += size

    def batch(self, items):
        keys = [key for key in self.prompts if any(key in self.pending[index][2] for index, _ in items)]
        inputs = None
        if hasattr(self.captioner, "inputs"):
            inputs = self.captioner.inputs([prepared for _, prepared in items], [self.prompts[key] for key in keys])
        return Batch(items, keys, inputs)


class OnSecondThread:
    """Iterates a generator on a second thread, at most `ahead` items before the caller. An error raised there is
    raised to the caller, after the items before it. close() ends the generator (its finally blocks run there:
    the image workers stop) and the thread. The thread takes the caller's CUDA device, so that pinned memory and
    the loader's pinning thread do not open a context on another GPU."""

    _END = object()

    def __init__(self, generator, ahead=1):
        self.ready = queue.Queue(maxsize=ahead)
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(generator, _current_cuda_device()),
                                       name="batcher", daemon=True)
        self.thread.start()

    def _fill(self, generator, device):
        if device is not None:
            import torch
            torch.cuda.set_device(device)
        try:
            for item in generator:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as error:  # raised in the caller's thread
            self._put((self._END, error))
        finally:
            generator.close()

    def _put(self, entry):
        """Hand an entry over unless the caller closed us; False once closed."""
        while not self.closing.is_set():
            try:
                self.ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            item, error = self.ready.get()
            if error is not None:
                raise error
            if item is self._END:
                return
            yield item

    def close(self):
        self.closing.set()
        self.thread.join()


def _current_cuda_device():
    import torch
    return torch.cuda.current_device() if torch.cuda.is_initialized() else None
