"""generate.sh on several GPUs: scaling with a real-size checkpoint, and exactly-once under failures.

    python -m bench.multi_gpu --real-size /tmp/qwen2-vl-7b-random --processes 1,2 --images 1024
    python -m bench.multi_gpu --checks --processes 2

--real-size DIR: a Qwen2-VL-7B with random weights is saved to DIR once, in the hub format (config,
safetensors shards, the tests' tokenizer and processor files), so every process loads it through the real
`from_pretrained` path. Then `bash generate.sh` runs on the same --images JPEGs once for each count of
--processes (NUM_GPUS=P, one process per GPU), each with exactly --new-tokens new tokens. Reported per run:
wall time, time from launch to the first caption line on disk (start-up: P processes loading the same
checkpoint at once), and each rank's images/s from its summary line; the aggregate against one GPU.

--checks: the exactly-once properties, on the tests' tiny Qwen2-VL checkpoint in float32 (greedy, so the
captions of any split must be identical): one process as the reference; two "nodes" on this host
(NNODES=2, NODE_RANK=0/1, one GPU each, started at once); one rank of a NUM_GPUS=P run killed with
SIGKILL mid-run, then the same command again; SIGTERM to a NUM_GPUS=P launcher mid-run (it must exit
143), then the same command again. Each is merged with utils/merge.py and compared with the reference.
Prints a table and writes JSON.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # generate.sh and utils/merge.py run from here

SUMMARY = re.compile(r"\[qwen rank (\d+)/(\d+)\] captioned (\d+), failed (\d+), skipped (\d+), ([\d.]+) s, "
                     r"([\d.]+) images/s")


def command(input_file, out, model, flags):
    return ["bash", "generate.sh", str(input_file), "qwen", "--model", str(model), "--output-dir", str(out), *flags]


def start(input_file, out, model, flags, **env):
    env = {**os.environ, "PYTHON": sys.executable, **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen(command(input_file, out, model, flags), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(process):
    _, stderr = process.communicate()
    return process.returncode, stderr


def caption_lines(out):
    rows = []
    for path in sorted(out.glob("qwen/*/default/captions-*.jsonl")):
        with open(path, "rb") as f:
            rows += [json.loads(line) for line in f if line.endswith(b"\n")]
    return rows


def merged(out):
    subprocess.run([sys.executable, "utils/merge.py", str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    composed = next(out.glob("qwen/*/default/composed.jsonl"))
    return sorted((row["image"], row["caption"]) for row in map(json.loads, open(composed)))


def wait_for_lines(process, out, count=1):
    """Seconds until `count` caption lines are on disk (None if the process ended first)."""
    started = time.perf_counter()
    while process.poll() is None:
        if len(caption_lines(out)) >= count:
            return time.perf_counter() - started
        time.sleep(0.05)
    return None


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


# ------------------------------------------------------------------------------------------------ scaling

def save_real_size_qwen(folder):
    """A random-weight Qwen2-VL-7B in the hub format: the real loading path reads it like a download."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from bench.throughput import qwen_checkpoint
    folder = Path(folder)
    if (folder / "model.safetensors.index.json").exists():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        path = qwen_checkpoint(Path(tmp), tiny=False)
        config = Qwen2VLForConditionalGeneration.config_class.from_pretrained(path)
        with torch.device("cuda"):
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="5GB")
        del model
        for name in os.listdir(path):
            if not name.startswith("model") and name != "config.json":
                os.replace(path / name, folder / name)
    return folder


def scaling(args, model, folder):
    from bench.throughput import make_images
    folder.mkdir()
    make_images(folder, args.images)
    flags = ["--max-new-tokens", str(args.new_tokens), "--min-new-tokens", str(args.new_tokens),
             "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
    rows = []
    for processes in args.processes:
        out = folder / f"out-{processes}"
        launched = time.perf_counter()
        process = start(folder / "input.json", out, model, flags, NUM_GPUS=processes)
        first_caption = wait_for_lines(process, out)
        status, stderr = finish(process)
        wall = time.perf_counter() - launched
        ranks = [dict(rank=int(m[1]), images=int(m[3]), seconds=float(m[6]), images_per_s=float(m[7]))
                 for m in SUMMARY.finditer(stderr)]
        rows.append(dict(processes=processes, status=status, wall_s=round(wall, 1),
                         first_caption_s=round(first_caption or -1, 1), ranks=sorted(ranks, key=lambda r: r["rank"]),
                         captioned=len(caption_lines(out)), stderr_tail=stderr[-600:] if status else ""))
    one = next((sum(r["images_per_s"] for r in row["ranks"]) for row in rows if row["processes"] == 1), None)
    for row in rows:
        total = sum(r["images_per_s"] for r in row["ranks"])
        row["aggregate_images_per_s"] = round(total, 2)
        row["vs_one_gpu"] = round(total / one, 2) if one else None
        row["slowest_rank_vs_one_gpu"] = (round(min(r["images_per_s"] for r in row["ranks"]) / one, 3)
                                          if one and row["ranks"] else None)
    return rows


# ------------------------------------------------------------------------------------------------- checks

def kill_one_rank(input_file, out, model, flags, processes):
    process = start(input_file, out, model, flags, NUM_GPUS=processes)
    killed_after = None
    while process.poll() is None:
        if caption_lines(out):
            pids = rank_pids()
            if processes - 1 in pids:
                os.kill(pids[processes - 1], signal.SIGKILL)
                killed_after = len(caption_lines(out))
                break
        time.sleep(0.05)
    status, _ = finish(process)
    return killed_after, status


def sigterm_launcher(input_file, out, model, flags, processes):
    process = start(input_file, out, model, flags, NUM_GPUS=processes)
    wait_for_lines(process, out)
    lines = len(caption_lines(out))
    process.send_signal(signal.SIGTERM)
    status, stderr = finish(process)
    return dict(lines_at_signal=lines, exit_status=status, traceback="Traceback" in stderr)


def checks(args, folder):
    from PIL import Image

    from tests.qwen_checkpoint import make_checkpoint
    from tests.sample_images import _pattern, write_input
    model = make_checkpoint(folder / "tiny-qwen2-vl")
    names = []
    for i in range(args.check_images):
        names.append(f"img{i:04d}.png")
        Image.fromarray(_pattern(60 + 13 * (i % 7), 50 + 11 * (i % 5), i)).save(folder / names[-1])
    input_file = write_input(folder / "input.json", names)
    flags = ["--max-new-tokens", "12", "--num-workers", "2", "--dtype", "float32", "--temperature", "0",
             "--batch-size", "2"]
    p = args.processes[-1]
    result = {}
    status, _ = finish(start(input_file, folder / "one", model, flags, NUM_GPUS=1))
    reference = merged(folder / "one")
    result["one process: every image"] = status == 0 and sorted(i for i, _ in reference) == sorted(names)

    nodes = [start(input_file, folder / "nodes", model, flags, NUM_GPUS=1, NNODES=2, NODE_RANK=r,
                   CUDA_VISIBLE_DEVICES=r % max(1, args.gpus)) for r in range(2)]
    statuses = [finish(n)[0] for n in nodes]
    per_file = [{row["image"] for row in map(json.loads, open(f))}
                for f in (folder / "nodes").glob("qwen/*/default/captions-*")]
    result["two nodes: exit statuses"] = statuses
    result["two nodes: shards disjoint and complete"] = (sum(map(len, per_file)) == len(names)
                                                         and set().union(*per_file) == set(names))
    result["two nodes: merged equals one process"] = merged(folder / "nodes") == reference

    killed_after, status = kill_one_rank(input_file, folder / "killed", model, flags, p)
    result[f"kill -9 rank {p - 1}: lines on disk then, launcher status"] = [killed_after, status]
    status, _ = finish(start(input_file, folder / "killed", model, flags, NUM_GPUS=p))
    rows = caption_lines(folder / "killed")
    result["kill -9, rerun: every image exactly once"] = (status == 0
                                                          and sorted(r["image"] for r in rows) == sorted(names))
    result["kill -9, rerun: merged equals one process"] = merged(folder / "killed") == reference

    result["SIGTERM to the launcher"] = sigterm_launcher(input_file, folder / "term", model, flags, p)
    status, _ = finish(start(input_file, folder / "term", model, flags, NUM_GPUS=p))
    rows = caption_lines(folder / "term")
    result["SIGTERM, rerun: every image exactly once"] = (status == 0
                                                          and sorted(r["image"] for r in rows) == sorted(names))
    result["SIGTERM, rerun: merged equals one process"] = merged(folder / "term") == reference
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-size", metavar="DIR", help="save (once) and use a random-weight Qwen2-VL-7B here")
    parser.add_argument("--checks", action="store_true", help="the exactly-once checks on the tiny checkpoint")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (one per GPU)")
    parser.add_argument("--images", type=int, default=1024, help="images for the scaling runs")
    parser.add_argument("--check-images", type=int, default=48, help="images for --checks")
    parser.add_argument("--new-tokens", type=int, default=77)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=6, help="image workers per process")
    parser.add_argument("--json", default="bench/out/multi_gpu.json")
    args = parser.parse_args()
    args.processes = [int(p) for p in args.processes.split(",")]
    args.gpus = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                   capture_output=True, text=True).stdout or 0)
    result = dict(gpus=args.gpus)
    with tempfile.TemporaryDirectory() as tmp:
        if args.real_size:
            started = time.perf_counter()
            model = save_real_size_qwen(args.real_size)
            result["real_size_saved_s"] = round(time.perf_counter() - started, 1)
            result["scaling"] = scaling(args, model, Path(tmp) / "scaling")
        if args.checks:
            os.makedirs(Path(tmp) / "checks")
            result["checks"] = checks(args, Path(tmp) / "checks")
    print(json.dumps(result, indent=1))
    for row in result.get("scaling", []):
        ranks = ", ".join(f"r{r['rank']} {r['images_per_s']:.2f}" for r in row["ranks"])
        print(f"{row['processes']} process(es): wall {row['wall_s']} s, first caption {row['first_caption_s']} s, "
              f"aggregate {row['aggregate_images_per_s']} images/s ({row['vs_one_gpu']}x one GPU), per rank: {ranks}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
