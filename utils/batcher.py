"""The batcher: read-ahead windows of prepared images -> batches, each with its CPU inputs, made on a second thread.

While the GPU captions one batch, the batcher's thread waits for the image workers, sorts their window by the
captioner's cost (similar lengths in one batch pad less), forms the next batches and makes each one's CPU inputs
(the captioner's cpu_inputs(): token ids, masks, positions), so that the GPU does not idle between batches. The
batch runner tells it a smaller batch size after an out-of-memory retry through a queue, the only thing that
flows back.
"""
import queue
import threading
from typing import Any, NamedTuple


class Batch(NamedTuple):
    items: list  # [(index into the pending images, prepared image)]; empty for a window without good images
    prompt_keys: list  # the prompts that some image of the batch still misses
    inputs: Any  # the captioner's cpu_inputs(images, prompts)
    errors: list  # [(index, reason)] of the window's unreadable images, carried by its first batch


def form_batch(captioner, prompts, pending, items, errors=()):
    """The Batch of `items` (index, prepared image): the prompts they miss and their CPU inputs."""
    keys = [key for key in prompts if any(key in pending[index][2] for index, _ in items)]
    inputs = captioner.cpu_inputs([prepared for _, prepared in items], [prompts[key] for key in keys]) if items else None
    return Batch(items, keys, inputs, list(errors))


class Batcher:
    """Forms the batches of each window in the batch size in force when each batch is formed."""

    def __init__(self, captioner, prompts, pending, batch_size, smaller_sizes):
        self.captioner, self.prompts, self.pending = captioner, prompts, pending
        self.batch_size, self.smaller_sizes = batch_size, smaller_sizes  # smaller_sizes: a queue.SimpleQueue

    def size_in_force(self):
        while not self.smaller_sizes.empty():
            self.batch_size = min(self.batch_size, self.smaller_sizes.get())
        return self.batch_size

    def batches(self, windows):
        """The Batches of each window: its good images sorted by cost, its unreadable ones in the first."""
        for window in windows:
            errors = [(index, error) for index, _, error in window if error]
            good = sorted(((index, prepared) for index, prepared, error in window if error is None),
                          key=lambda item: self.captioner.cost(item[1]))
            if not good:
                yield form_batch(self.captioner, self.prompts, self.pending, [], errors)
            start = 0
            while start < len(good):
                size = self.size_in_force()
                yield form_batch(self.captioner, self.prompts, self.pending, good[start:start + size], errors)
                start, errors = start + size, []


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
