"""Hash buckets on disk: how utils/merge.py and utils/merge_multi_caption.py handle any number of rows in
bounded memory.

Each script spreads its rows by a hash of the image path into bucket files in a temporary folder, one
line per field, then reads the buckets back one at a time: all rows of one image are in the same bucket,
so finding duplicates or joining captions needs only one bucket in memory. This module holds what both
share: the bucket count and its --buckets and --workers options, the hash, and opening and reading the
bucket files.
"""
import contextlib
import os
import resource
import zlib


class BucketSizing:
    """One bucket per `bytes_per_bucket` of input, 1 to `max_buckets` of them."""

    def __init__(self, bytes_per_bucket, max_buckets):
        self.bytes_per_bucket, self.max_buckets = bytes_per_bucket, max_buckets

    def count(self, input_bytes):
        return max(1, min(self.max_buckets, input_bytes // self.bytes_per_bucket + 1))

    def add_arguments(self, parser, memory, workers):
        """--buckets and --workers; memory: what one bucket puts in memory, workers: what runs in parallel."""
        parser.add_argument("--buckets", type=int, metavar="N",
                            help=f"hash buckets (1 to {self.max_buckets}); peak memory is about {memory}. "
                                 f"Default: one per {self.bytes_per_bucket >> 20} MiB of input")
        parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                            help=f"{workers} (default: CPU count, at most 4)")

    def check_arguments(self, parser, args):
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        if args.buckets is not None and not 1 <= args.buckets <= self.max_buckets:
            parser.error(f"--buckets must be between 1 and {self.max_buckets}")


def bucket_of(image, count):
    """The bucket of an image path. crc32, not hash(): hash() differs between processes unless they are
    forked from one parent."""
    return zlib.crc32(image.encode("utf-8", "surrogatepass")) % count


def bucket_path(work, name, b):
    return os.path.join(work, f"{name}-{b}")


def raise_open_file_limit(files):
    """Let this process hold `files` more files open: the soft limit (often 1024) up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = files + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(hard, wanted),
                                                    hard))


@contextlib.contextmanager
def open_buckets(work, name, count, mode="w"):
    """The list of bucket files NAME-0 ... NAME-<count - 1> in `work`, open as UTF-8 text for the block."""
    raise_open_file_limit(count)
    files = []
    try:
        for b in range(count):
            files.append(open(bucket_path(work, name, b), mode, encoding="utf-8"))
        yield files
    finally:
        for f in files:
            f.close()


def read_columns(work, name, b, fields):
    """The `fields` columns of one bucket file, whose entries are `fields` lines each, as lists of lines
    without their newline (str.split and slicing take them apart without a Python loop per line). The file
    is removed: it is read once."""
    path = bucket_path(work, name, b)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    os.remove(path)
    return [lines[field:-1:fields] for field in range(fields)]
