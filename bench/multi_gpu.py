"""generate.sh on several processes against one process: same captions, exactly once, and the speed-up.

    python bench/multi_gpu.py --processes 2 [--model CKPT] [--images 64]

Runs `bash generate.sh` on the same input (greedy) three ways: one process; N processes (NUM_GPUS=N:
one per GPU, or all on one GPU when fewer are visible); N processes again, with one rank killed
(SIGKILL) mid-run and the command repeated. Then merges each with utils/merge.py and checks that the
shards were disjoint and complete, that the merged captions equal the one-process run's, and that the
interrupted run ends with every image exactly once. Without --model it builds the tests' tiny Qwen2-VL
checkpoint. Prints a table and writes JSON.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def launch(input_file, out, model, processes, extra, wait=True):
    command = ["bash", "generate.sh", str(input_file), "qwen", "--model", model, "--output-dir", str(out),
               "--temperature", "0", *extra]
    env = {**os.environ, "NUM_GPUS": str(processes), "PYTHON": sys.executable}
    if wait:
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def caption_lines(out):
    return [json.loads(line) for path in sorted(out.glob("qwen/*/default/captions-*.jsonl")) for line in open(path)]


def merged(out):
    subprocess.run([sys.executable, "utils/merge.py", str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    composed = next(out.glob("qwen/*/default/composed.jsonl"))
    return sorted((row["image"], row["caption"]) for row in map(json.loads, open(composed)))


def rank_pids():
    """The running caption processes by their RANK (the first of each rank: its image workers come later)."""
    pids = {}
    for pid in subprocess.run(["pgrep", "-f", "qwen.py"], capture_output=True, text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                pids[int(item[5:])] = min(int(pid), pids.get(int(item[5:]), int(pid)))
    return pids


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", help="a Qwen2-VL checkpoint folder (default: the tests' tiny one)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more flags for qwen.py")
    parser.add_argument("--json", default="bench/out/multi_gpu.json")
    args = parser.parse_args()
    from PIL import Image
    from qwen_checkpoint import make_checkpoint
    from sample_images import _pattern, write_input

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(make_checkpoint(tmp / "tiny-qwen2-vl"))
        names = []
        for i in range(args.images):
            names.append(f"img{i:04d}.png")
            Image.fromarray(_pattern(60 + 13 * (i % 7), 50 + 11 * (i % 5), i)).save(tmp / names[-1])
        input_file = write_input(tmp / "input.json", names)
        flags = ["--max-new-tokens", "12", "--num-workers", "2", *args.flags]

        one_seconds = launch(input_file, tmp / "one", model, 1, flags)
        many_seconds = launch(input_file, tmp / "many", model, args.processes, flags)
        per_rank = {}
        for row_file in (tmp / "many").glob("qwen/*/default/captions-*.jsonl"):
            per_rank[row_file.name] = {json.loads(line)["image"] for line in open(row_file)}
        shards = list(per_rank.values())
        disjoint = sum(map(len, shards)) == len(set().union(*shards))
        complete = set().union(*shards) == set(names)

        # Kill one rank once its first batch is written, then run the same command again.
        process = launch(input_file, tmp / "killed", model, args.processes, flags + ["--batch-size", "2"], wait=False)
        killed_after = None
        while process.poll() is None:
            if caption_lines(tmp / "killed"):
                pids = rank_pids()
                if args.processes - 1 in pids:
                    os.kill(pids[args.processes - 1], signal.SIGKILL)
                    killed_after = len(caption_lines(tmp / "killed"))
                    break
            time.sleep(0.05)
        process.wait()
        launch(input_file, tmp / "killed", model, args.processes, flags + ["--batch-size", "2"])
        resumed = caption_lines(tmp / "killed")

        result = dict(
            processes=args.processes, images=args.images, model=args.model or "tests' tiny Qwen2-VL",
            one_process_s=round(one_seconds, 2), many_processes_s=round(many_seconds, 2),
            speedup=round(one_seconds / many_seconds, 2), shards_disjoint=disjoint, shards_complete=complete,
            merged_equals_one_process=merged(tmp / "many") == merged(tmp / "one"),
            killed_rank_after_lines=killed_after,
            resumed_exactly_once=sorted(r["image"] for r in resumed) == sorted(names),
            resumed_equals_one_process=merged(tmp / "killed") == merged(tmp / "one"),
        )
    for key, value in result.items():
        print(f"{key:28} {value}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    checks = ("shards_disjoint", "shards_complete", "merged_equals_one_process", "resumed_exactly_once",
              "resumed_equals_one_process")
    sys.exit(0 if all(result[k] for k in checks) and killed_after is not None else 1)


if __name__ == "__main__":
    main()
