"""Start-up at scale: how long one process takes to know its work (its part of the input, less what earlier runs
captioned), and its peak memory, for synthetic JSON array and JSONL inputs of millions of entries.

    python -m bench.startup --entries 2000000 --done 1000000 --json bench-startup.json

Each row runs a fresh process (python -c, the loop's own read_part and plan_work) pinned to one core, as the last
rank of --world (the one that reads furthest into the input). No model is loaded. A JSON array is timed twice for
each output folder: scanned, as the first process of a run scans it and keeps its marks, and then with them kept.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PLAN = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from utils.input_reader import read_part
from utils.resume import plan_work
from utils.settings import ProcessPlace
started = time.perf_counter()
path, rank, world, out, marks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
place = ProcessPlace(rank, world, 0, rank, world)
settings = SimpleNamespace(input=path, place=place, limit=None, image_root=None, model_dir=Path(out),
                           prompts={"default": "Describe the image in detail:"}, overwrite=False, retry_errors=False)
work = plan_work(settings, read_part(path, rank, world, None, None, marks))
print(len(work.pending), work.skipped, time.perf_counter() - started)
"""


def image_id(index):
    return f"images/{index // 10000:05d}/{index:09d}.jpg"


def write_inputs(folder, entries):
    """in.jsonl and in.json with `entries` image paths (written once, kept for later runs)."""
    jsonl, array = folder / f"in-{entries}.jsonl", folder / f"in-{entries}.json"
    if not jsonl.exists():
        with open(jsonl, "w") as f:
            for start in range(0, entries, 100_000):
                f.write("".join(f'{{"image": "{image_id(i)}"}}\n' for i in range(start, min(entries, start + 100_000))))
    if not array.exists():
        with open(array, "w") as f:
            f.write("[\n")
            for start in range(0, entries, 100_000):
                stop = min(entries, start + 100_000)
                f.write(",\n".join(f'{{"image": "{image_id(i)}"}}' for i in range(start, stop)))
                f.write(",\n" if stop < entries else "\n]\n")
    return jsonl, array


def write_done(folder, entries, done):
    """An output folder whose captions file holds the first `done` images, as an earlier run writes them."""
    prompt = folder / f"out-{entries}-{done}" / "default"
    prompt.mkdir(parents=True, exist_ok=True)
    captions = prompt / "captions-00000-of-00001.jsonl"
    if not captions.exists():
        with open(captions, "w") as f:
            for start in range(0, done, 100_000):
                f.write("".join(json.dumps({"image": image_id(i), "caption": "a photo of a cat on a red couch by a "
                                            "window", "model": "Qwen/Qwen2-VL-7B-Instruct", "prompt": "default",
                                            "truncated": False}) + "\n" for i in range(start, min(done, start + 100_000))))
    return prompt.parent


def plan_once(path, rank, world, out, marks):
    """(seconds to know the work, peak memory in MiB, pending, skipped) of one fresh process on one core."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", "taskset", "-c", "0", sys.executable, "-c", PLAN, str(path),
                             str(rank), str(world), str(out), str(marks)], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])
    wall = time.perf_counter() - started
    pending, skipped, _ = result.stdout.split()
    return wall, int(result.stderr.split()[-1]) / 1024, int(pending), int(skipped)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2_000_000, help="entries of the synthetic inputs")
    parser.add_argument("--done", type=int, default=1_000_000, help="captions an earlier run wrote (0: none)")
    parser.add_argument("--world", type=int, default=8, help="processes the input is split among; the last is timed")
    parser.add_argument("--folder", default="/tmp/bench-startup", help="where the inputs are written (and kept)")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(folder, args.entries)
    outputs = [(0, folder / "none"), *([(args.done, write_done(folder, args.entries, args.done))] if args.done else [])]
    rows = []
    print(f"{'input':<28} {'done':>10} {'marks':>8} {'rank':>9} {'seconds':>8} {'peak MiB':>9} {'pending':>9} "
          f"{'skipped':>9}")
    for path in inputs:
        for done, out in outputs:
            kinds = ["scanned", "kept"] if path.suffix == ".json" else ["-"]
            marks = folder / f"marks-{time.time_ns()}"
            for kind in kinds:
                wall, peak, pending, skipped = plan_once(path, args.world - 1, args.world, out, marks)
                rows.append({"input": path.name, "size_bytes": os.path.getsize(path), "done": done, "marks": kind,
                             "rank": f"{args.world - 1}/{args.world}", "seconds": round(wall, 2),
                             "peak_mib": round(peak), "pending": pending, "skipped": skipped})
                print(f"{path.name:<28} {done:>10} {kind:>8} {rows[-1]['rank']:>9} {wall:>8.2f} {peak:>9.0f} "
                      f"{pending:>9} {skipped:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
