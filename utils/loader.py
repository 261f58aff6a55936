"""The image workers: DataLoader worker processes that read and prepare the images, handed to the loop in
read-ahead windows (image ids -> prepared images or the reason an image is unreadable)."""
import signal

from utils.images import UnreadableImage, decode_image
from utils.inputs import read_image_bytes


class ImageDataset:
    """Opens and prepares one image per item, by its id (a file, a tar member, a Parquet row: see
    utils/inputs.py); runs in the DataLoader's worker processes, each reading only the bytes of its images (a
    map-style dataset: the DataLoader needs only __len__ and __getitem__, so this module does not import torch)."""

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


def _ignore_signals_in_worker(worker_id):
    # The main process decides when to stop; a worker killed by Ctrl-C would lose its batch noisily.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def prepared_windows(pending, image_root, prepare, args):
    """Yield read-ahead windows of (index into pending, prepared image or None, error or None), each
    --sort-window batches long but the first, which is one batch: the model starts as soon as one batch is
    prepared (in bench/RESULTS.md's run 23, InternVL2 at batch 128 waited 4 s for its first window). Workers
    prepare small chunks in parallel, enough in flight to fill the next window while the GPU works on this one;
    with a GPU their tensors arrive in pinned memory, so that copies to the GPU (to_device) run while the CPU
    goes on."""
    import torch
    window_size = args.batch_size * args.sort_window
    chunk_size = min(8, args.batch_size)
    loader = torch.utils.data.DataLoader(
        ImageDataset(pending, image_root, prepare), batch_size=chunk_size, num_workers=args.num_workers,
        collate_fn=list, worker_init_fn=_ignore_signals_in_worker, pin_memory=torch.cuda.is_available(),
        prefetch_factor=max(2, -(-window_size // (chunk_size * args.num_workers))) if args.num_workers else None,
    )
    window, size = [], args.batch_size
    for chunk in loader:
        window += chunk
        if len(window) >= size:
            yield window
            window, size = [], window_size
    if window:
        yield window
