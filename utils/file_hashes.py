"""Content digests of large files (checkpoint weights), computed once and kept, so that a resume costs nothing.

A digest is BLAKE3 over the file's bytes, on all cores (the blake3 package: memory-mapped, multi-threaded), so that
two fine-tunes of one base, whose files differ only in their weights, are told apart. Each result is kept in a
JSONL file (~/.cache/synthetic-caption/file-digests.jsonl, or $SYNTHETIC_CAPTION_CACHE), keyed by the file's
path, size and modification time: a changed file is hashed again. A file modified less than RACY_NS before it was
hashed keeps no digest, since a change within one tick of the file system's clock would leave its key as it was
(git's "racily clean" files). Processes that start together may each hash a file once; they append whole lines,
and a partial line left by a killed process is ignored.
"""
import json
import os
import time

import blake3

from utils.caches import cache_folder
from utils.records import complete_lines

RACY_NS = 2_000_000_000  # the coarsest modification-time granularity of common file systems (FAT: 2 s)


def cache_path():
    return os.path.join(cache_folder(), "file-digests.jsonl")


def file_key(path):
    stat = os.stat(path)
    return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]


def kept_digests():
    """{(path, size, mtime_ns): digest} of the cache; empty where there is none."""
    kept = {}
    try:
        with open(cache_path(), "rb") as f:
            for line in complete_lines(f):
                try:
                    row = json.loads(line)
                    kept[tuple(row["file"])] = row["blake3"]
                except (ValueError, KeyError, TypeError):
                    continue  # not one of ours
    except OSError:
        pass
    return kept


def keep_digest(key, digest):
    """Append one line to the cache; a cache that cannot be written only costs the next run the hashing."""
    try:
        os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
        with open(cache_path(), "a", encoding="utf-8") as f:
            f.write(json.dumps({"file": key, "blake3": digest}) + "\n")
    except OSError:
        pass


def content_digest(path, kept=None):
    """"blake3:<hex>" of a file's bytes, from the cache when the file is unchanged since it was hashed."""
    key = file_key(path)
    kept = kept_digests() if kept is None else kept
    digest = kept.get(tuple(key))
    if digest is None:
        started = time.time_ns()
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if key[1]:
            hasher.update_mmap(path)
        digest = hasher.hexdigest()
        if started - key[2] >= RACY_NS:
            keep_digest(key, digest)
    return "blake3:" + digest
