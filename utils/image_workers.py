"""The image workers: DataLoader worker processes that read and prepare the images (image ids -> prepared images,
or the reason an image is unreadable), handed on in read-ahead windows."""
import ctypes
import functools
import os
import signal
import sys

from utils.images import UnreadableImage, decode_image
from utils.input_reader import read_image_bytes

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ImageDataset:
    """Opens and prepares one image per item, by its id (a file, a tar member, a Parquet row); runs in the worker
    processes, each reading only the bytes of its images. A map-style dataset: the DataLoader needs only __len__
    and __getitem__, so this module does not import torch."""

    def __init__(self, items, image_root, prepare):
        self.items, self.image_root, self.prepare = items, image_root, prepare

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image_id = self.items[index][0]
        try:
            prepared = self.prepare(decode_image(read_image_bytes(image_id, self.image_root)))
        except UnreadableImage as e:
            return index, None, str(e)
        except Exception as e:  # the model's own preprocessing refused this image (e.g. aspect ratio)
            return index, None, f"cannot preprocess: {type(e).__name__}: {e}"
        return index, prepared, None


def start_worker(parent, worker_id):
    """The main process decides when to stop: a worker ignores Ctrl-C and SIGTERM (it would lose its images
    noisily), and dies with its parent, at once, even when the parent is killed with SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def prepared_windows(pending, image_root, prepare, settings):
    """Start the workers and return the read-ahead windows they fill (windows_of). They start here, on the
    caller's thread, before torch.compile's thread runs: a process forked while another thread works inherits the
    locks that thread holds, and a worker could wait for one forever. Workers prepare small chunks in parallel,
    enough in flight to fill the next window while the GPU works on this one; with a GPU their tensors arrive in
    pinned memory, so that copies to the GPU run while the CPU goes on."""
    import torch
    window_size = settings.batch_size * settings.sort_window
    chunk_size = min(8, settings.batch_size)
    workers = settings.num_workers
    loader = torch.utils.data.DataLoader(
        ImageDataset(pending, image_root, prepare), batch_size=chunk_size, num_workers=workers,
        collate_fn=list, worker_init_fn=functools.partial(start_worker, os.getpid()),
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=max(2, -(-window_size // (chunk_size * workers))) if workers else None,
    )
    return windows_of(iter(loader), settings.batch_size, window_size)


def windows_of(chunks, first_size, window_size):
    """Yield windows of (index into pending, prepared image or None, error or None), each `window_size` long but
    the first, which is `first_size` (one batch), so that the model starts as soon as one batch is prepared.
    Closing it frees the loader's iterator, which stops the workers."""
    window, size = [], first_size
    for chunk in chunks:
        window += chunk
        if len(window) >= size:
            yield window
            window, size = [], window_size
    if window:
        yield window
