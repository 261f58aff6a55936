"""The cost of telling checkpoints apart by their content: the run record's identity of a checkpoint folder (every
weight file hashed with BLAKE3) on its first run and on a resume, against the model load's own read of the same
files (safetensors onto the GPU, or into memory without one).

    python -m bench.checkpoint_hash --gib 16 --folder /tmp/ckpt --json bench-hash.json

The folder is filled once with random bfloat16 tensors in 4 GiB safetensors files and kept. Every row reads files
the row before read too, so all rows read from the page cache where it holds them; a cold read is bound by the
disk, for the hashing and the load alike.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from utils.checkpoints import hash_contents

FILE_GIB = 4


def fill(folder, gib):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(-(-gib // FILE_GIB)):
        path = folder / f"model-{index:05d}.safetensors"
        if not path.exists():
            size = min(FILE_GIB, gib - index * FILE_GIB) << 29  # bfloat16 elements: 2 bytes each
            tensors = {f"layer.{i}.weight": torch.randn(size // 16, dtype=torch.bfloat16) for i in range(16)}
            save_file(tensors, path)
    (folder / "config.json").write_text("{}\n")


def timed(function):
    started = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def load(folder):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path, device=device)
        del tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=int, default=16, help="checkpoint size in GiB")
    parser.add_argument("--folder", default="/tmp/bench-checkpoint", help="where the checkpoint is written and kept")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    folder = Path(args.folder)
    fill(folder, args.gib)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SYNTHETIC_CAPTION_CACHE"] = cache
        rows = {"load (safetensors, the model's own read)": timed(lambda: load(folder)),
                "identity, first run (BLAKE3 of every file)": timed(lambda: hash_contents(str(folder))),
                "identity, resume (kept digests)": timed(lambda: hash_contents(str(folder))),
                "load again": timed(lambda: load(folder))}
    print(f"{'what':<46} {'seconds':>8} {'GiB/s':>7}   ({args.gib} GiB, {os.cpu_count()} cores)")
    for what, seconds in rows.items():
        print(f"{what:<46} {seconds:>8.2f} {args.gib / seconds:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gib": args.gib, "cores": os.cpu_count(), "seconds": rows}, indent=2))


if __name__ == "__main__":
    main()
