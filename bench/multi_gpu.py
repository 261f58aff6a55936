"""generate.sh on several GPUs: scaling with a real-size checkpoint, and exactly-once under failures.

    python -m bench.multi_gpu --real-size /tmp/qwen2-vl-7b-random --processes 1,2 --images 1024
    python -m bench.multi_gpu --captioner internvl --real-size /tmp/internvl2-8b-random --processes 1,8
    python -m bench.multi_gpu --checks --processes 2

--real-size DIR: a checkpoint with random weights is saved to DIR once, so that every process loads it as it
would load a download. Qwen2-VL-7B (--captioner qwen): the hub format (config, safetensors shards, the tests'
tokenizer and processor files), read by the real `from_pretrained` path. InternVL2-8B (--captioner internvl): the
original format in DIR/original (InternVLChatModel's key names, bfloat16 shards of at most 5 GB; the tests' tiny
tokenizer, so the vocabulary is the tokenizer's, not InternLM2.5's 92,553), which each process converts at load;
then `internvl.py --convert-to DIR/native` (timed) and the native folder. Then `bash generate.sh` runs on the same
--images JPEGs for each folder and each count of --processes (NUM_GPUS=P, one process per GPU), greedy, each caption
exactly --new-tokens new tokens (--generate-args adds flags). A checkpoint's runs share a torch.compile cache folder
that starts empty: the first run compiles as on a fresh machine, the later ones find its kernels (so
`--processes 1,1` is a fresh run and a warm one). --baseline DIR runs each of them with DIR's generate.sh too
(another checkout: old code against new in one run), with a cache of its own. Reported per run: wall time, the
caption lines on disk every second, the time from launch to the first of them (start-up: P processes loading the
same checkpoint at once) and to half of them, the rate over the second half, host memory sampled every 0.2 s (one
rank's peak resident and anonymous memory, and all ranks' anonymous memory at once: the part they do not share,
where a conversion at load holds the whole checkpoint), and each rank's images/s from its summary line; the
aggregate against one GPU.

--checks: the exactly-once properties, on the tests' tiny Qwen2-VL checkpoint in float32 (greedy, so the
captions of any split must be identical): one process as the reference; two "nodes" on this host
(NNODES=2, NODE_RANK=0/1, one GPU each, started at once); one rank of a NUM_GPUS=P run killed with
SIGKILL mid-run, then the same command again; SIGTERM to a NUM_GPUS=P launcher mid-run (it must exit
143), then the same command again; a job array's layout, --array-units units (`--part I/K`) started at once over
the host's GPUs, one unit killed with SIGKILL (its whole process group, as a scheduler ends a task) and rerun alone.
Each is merged with utils/merge.py and compared with the reference.
Prints a table and writes JSON.
"""
import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # generate.sh and utils/merge.py run from here

SUMMARY = re.compile(r"\[\w+ (?:part \d+/\d+ )?rank (\d+)/(\d+)\] captioned (\d+), failed (\d+), skipped (\d+), "
                     r"([\d.]+) s, ([\d.]+) images/s")


def start(input_file, out, model, flags, captioner="qwen", own_group=False, repo=REPO, **env):
    """`bash generate.sh` of `repo` in the background; `own_group`: in a process group of its own (to kill it
    whole)."""
    env = {**os.environ, "PYTHON": sys.executable, **{k: str(v) for k, v in env.items()}}
    command = ["bash", "generate.sh", str(input_file), captioner, "--model", str(model), "--output-dir", str(out),
               *flags]
    return subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=own_group)


def finish(process):
    _, stderr = process.communicate()
    return process.returncode, stderr


def caption_lines(out, files="captions-*.jsonl"):
    rows = []
    for path in sorted(out.glob(f"*/*/*/{files}")):
        with open(path, "rb") as f:
            rows += [json.loads(line) for line in f if line.endswith(b"\n")]
    return rows


def merged(out):
    subprocess.run([sys.executable, "utils/merge.py", str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    composed = next(out.glob("*/*/*/composed.jsonl"))
    return sorted((row["image"], row["caption"]) for row in map(json.loads, open(composed)))


def wait_for_lines(process, out, count=1, files="captions-*.jsonl"):
    """Seconds until `count` caption lines are on disk in `files` (None if the process ended first)."""
    started = time.perf_counter()
    while process.poll() is None:
        if len(caption_lines(out, files)) >= count:
            return time.perf_counter() - started
        time.sleep(0.05)
    return None


def caption_curve(process, out, every=1.0):
    """(seconds since the start, caption lines on disk) every `every` s until the process ends."""
    started, curve = time.perf_counter(), []
    while process.poll() is None:
        curve.append((round(time.perf_counter() - started, 1), len(caption_lines(out))))
        time.sleep(every)
    return curve


def seconds_to(curve, count):
    """When the curve first reached `count` captions (None if never)."""
    return next((seconds for seconds, lines in curve if lines >= count), None)


def rank_pids(captioner="qwen"):
    """The running caption processes by their RANK, 0 where none is set (one process: generate.sh runs the script
    itself); the first of each rank, as its image workers come later. The launcher, whose command names the
    script too, is not one."""
    pids = {}
    for pid in subprocess.run(["pgrep", "-f", f"{captioner}.py"], capture_output=True, text=True).stdout.split():
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(arguments) < 2 or not arguments[1].endswith(f"{captioner}.py".encode()):
            continue
        rank = next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), 0)
        pids[rank] = min(int(pid), pids.get(rank, int(pid)))
    return pids


def memory_gib(pid):
    """(peak resident so far, anonymous now) of a process, GiB; (0, 0) once it is gone. Anonymous memory is the
    process's own; the rest of its resident memory is file pages (safetensors mapped), which the ranks share."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return tuple(int(fields.get(name, "0 kB").split()[0]) / 2**20 for name in ("VmHWM", "RssAnon"))


class HostMemory(threading.Thread):
    """Samples the ranks' memory until stopped: one rank's peak resident and peak anonymous memory, and the peak of
    all ranks' anonymous memory at once."""

    def __init__(self, captioner):
        super().__init__(daemon=True)
        self.captioner, self.stopped = captioner, threading.Event()
        self.resident = self.anonymous = self.all_anonymous = 0.0

    def run(self):
        while not self.stopped.wait(0.2):
            sizes = [memory_gib(pid) for pid in rank_pids(self.captioner).values()]
            self.resident = max([self.resident, *(peak for peak, _ in sizes)])
            self.anonymous = max([self.anonymous, *(anonymous for _, anonymous in sizes)])
            self.all_anonymous = max(self.all_anonymous, sum(anonymous for _, anonymous in sizes))

    def stop(self):
        self.stopped.set()
        self.join()
        return dict(rank_peak_resident_gib=round(self.resident, 1), rank_peak_anonymous_gib=round(self.anonymous, 1),
                    all_ranks_peak_anonymous_gib=round(self.all_anonymous, 1))


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


def save_real_size_internvl(folder):
    """A random-weight InternVL2-8B in the original format, drawn on the GPU: the tests' tiny original folder
    (tokenizer, configs) given InternVL2-8B's sizes, its weights in 5 GB shards with their index, as published."""
    import torch
    from safetensors.torch import save_file

    from bench.throughput import INTERNVL2_8B_LLM, INTERNVL2_8B_VISION
    from tests.internvl_checkpoint import build_checkpoint, random_state_dict
    folder = Path(folder)
    if (folder / "model.safetensors.index.json").exists():
        return folder
    build_checkpoint(str(folder))
    (folder / "model.safetensors").unlink()  # the tiny weights; the real-size shards replace them
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"].update(INTERNVL2_8B_VISION)
    config["llm_config"].update({**INTERNVL2_8B_LLM, "vocab_size": config["llm_config"]["vocab_size"]})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state_dict = {key: tensor.to(torch.bfloat16) for key, tensor in random_state_dict(config, device="cuda").items()}
    shards, shard, shard_bytes = [], {}, 0
    for key, tensor in state_dict.items():
        if shard and shard_bytes + tensor.nbytes > 5 * 10**9:
            shards, shard, shard_bytes = shards + [shard], {}, 0
        shard[key], shard_bytes = tensor, shard_bytes + tensor.nbytes
    shards.append(shard)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({key: tensor.cpu() for key, tensor in shard.items()}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state_dict.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return folder


def convert_timed(original, native):
    """`python internvl.py --convert-to native` (once): seconds and the converting process's peak memory."""
    if (native / "config.json").exists():
        return {}
    started = time.perf_counter()
    subprocess.run([sys.executable, "internvl.py", "--convert-to", str(native), "--model", str(original)], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB: the largest child so far
    return dict(convert_s=round(time.perf_counter() - started, 1), convert_peak_gib=round(peak, 1))


def real_size_models(captioner, folder, result):
    """The real-size folders to run, by label, saved once (and, for InternVL2, converted once) under `folder`; the
    times that took go into `result`."""
    started = time.perf_counter()
    if captioner == "qwen":
        models = {"hub format": save_real_size_qwen(folder)}
        result["real_size_saved_s"] = round(time.perf_counter() - started, 1)
        return models
    original, native = save_real_size_internvl(folder / "original"), folder / "native"
    result["real_size_saved_s"] = round(time.perf_counter() - started, 1)
    result.update(convert_timed(original, native))
    return {"original, converted at load": original, "--convert-to folder": native}


def one_run(args, captioner, model, input_file, out, processes, compile_cache, repo):
    """`bash generate.sh` of `repo` once with NUM_GPUS=processes: its timings, memory and each rank's summary."""
    flags = ["--max-new-tokens", str(args.new_tokens), "--min-new-tokens", str(args.new_tokens), "--temperature",
             "0", "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
             *args.generate_args.split()]
    launched = time.perf_counter()
    memory = HostMemory(captioner)
    memory.start()
    process = start(input_file, out, model, flags, captioner, repo=repo, NUM_GPUS=processes,
                    TORCHINDUCTOR_CACHE_DIR=compile_cache)
    curve = caption_curve(process, out)
    status, stderr = finish(process)
    wall = time.perf_counter() - launched
    ranks = [dict(rank=int(m[1]), images=int(m[3]), seconds=float(m[6]), images_per_s=float(m[7]))
             for m in SUMMARY.finditer(stderr)]
    half = args.images // 2
    return dict(processes=processes, status=status, wall_s=round(wall, 1),
                first_caption_s=seconds_to(curve, 1), half_s=seconds_to(curve, half),
                second_half_images_per_s=rate(curve, half, args.images), **memory.stop(),
                ranks=sorted(ranks, key=lambda r: r["rank"]), captioned=len(caption_lines(out)),
                caption_curve=curve, stderr_tail=stderr[-3000:] if status else "")


def rate(curve, start, end):
    """Images per second from the `start`th caption to the `end`th."""
    begun, ended = seconds_to(curve, start), seconds_to(curve, end)
    return round((end - start) / (ended - begun), 2) if begun is not None and ended and ended > begun else None


def scaling(args, captioner, models, folder):
    """One row per checkpoint of `models` ({label: folder}), count of processes and code tree (this one, and
    --baseline's, each run in turn)."""
    from bench.throughput import make_images
    folder.mkdir()
    make_images(folder, args.images)
    trees = {"this tree": REPO, **({f"baseline {args.baseline.name}": args.baseline} if args.baseline else {})}
    rows = []
    for index, (label, path) in enumerate(models.items()):
        for run, processes in enumerate(args.processes):
            for tree, (code, repo) in enumerate(trees.items()):
                compile_cache = folder / f"torchinductor-{tree}-{index}"  # empty at first, as on a fresh machine
                out = folder / f"out-{tree}-{index}-{run}"  # its own folder, so that --processes 1,1 runs twice
                rows.append(dict(checkpoint=label, code=code, **one_run(args, captioner, path, folder / "input.json",
                                                                        out, processes, compile_cache, repo)))
    for row in rows:
        one = next((sum(r["images_per_s"] for r in other["ranks"]) for other in rows
                    if other["processes"] == 1 and (other["checkpoint"], other["code"]) == (row["checkpoint"],
                                                                                         row["code"])), None)
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
    result.update(array_units(args, input_file, folder / "array", model, flags, reference, names))
    return result


def array_units(args, input_file, out, model, flags, reference, names):
    """A job array's units over the host's GPUs, started at once; one killed whole once it has written a line,
    then rerun alone."""
    units, killed = args.array_units, args.array_units // 2
    processes = [start(input_file, out, model, [*flags, "--part", f"{i}/{units}"], own_group=True, NUM_GPUS=1,
                       CUDA_VISIBLE_DEVICES=i % max(1, args.gpus)) for i in range(units)]
    killed_file = f"captions-{killed:05d}-of-{units:05d}.jsonl"
    lines_at_kill = None
    if wait_for_lines(processes[killed], out, files=killed_file) is not None:
        os.killpg(processes[killed].pid, signal.SIGKILL)
        lines_at_kill = len(caption_lines(out, killed_file))
    statuses = [finish(p)[0] for p in processes]
    rerun = finish(start(input_file, out, model, [*flags, "--part", f"{killed}/{units}"], NUM_GPUS=1))[0]
    rows = caption_lines(out)
    return {f"array of {units}: unit {killed} killed after lines, statuses": [lines_at_kill, statuses],
            f"array: unit {killed} rerun alone: status": rerun,
            "array: every image exactly once": sorted(r["image"] for r in rows) == sorted(names),
            "array: merged equals one process": merged(out) == reference}


def summary_line(row):
    ranks = ", ".join(f"r{r['rank']} {r['images_per_s']:.2f}" for r in row["ranks"])
    return (f"{row['checkpoint']}, {row['code']}: {row['processes']} process(es): wall {row['wall_s']} s, "
            f"first caption {row['first_caption_s']} s, half the images {row['half_s']} s, second half "
            f"{row['second_half_images_per_s']} images/s, host memory: a rank {row['rank_peak_resident_gib']} GiB "
            f"resident, {row['rank_peak_anonymous_gib']} its own, all ranks' own {row['all_ranks_peak_anonymous_gib']};"
            f" aggregate {row['aggregate_images_per_s']} images/s ({row['vs_one_gpu']}x one GPU), per rank: {ranks}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captioner", choices=["qwen", "internvl"], default="qwen",
                        help="the model of --real-size: Qwen2-VL-7B or InternVL2-8B")
    parser.add_argument("--real-size", metavar="DIR", help="save (once) and use a random-weight checkpoint here")
    parser.add_argument("--checks", action="store_true", help="the exactly-once checks on the tiny checkpoint")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (one per GPU)")
    parser.add_argument("--images", type=int, default=1024, help="images for the scaling runs")
    parser.add_argument("--check-images", type=int, default=48, help="images for --checks")
    parser.add_argument("--array-units", type=int, default=3, help="units of --checks' job array")
    parser.add_argument("--new-tokens", type=int, default=77, help="new tokens of every caption")
    parser.add_argument("--batch-size", type=int, default=256, help="--batch-size of the scaling runs")
    parser.add_argument("--num-workers", type=int, default=6, help="image workers per process")
    parser.add_argument("--generate-args", default="", metavar="ARGS",
                        help="more flags for every scaling run's generate.sh, e.g. \"--no-compile\"")
    parser.add_argument("--baseline", type=lambda path: Path(path).resolve(), metavar="DIR",
                        help="another checkout of the project (e.g. `git archive REV | tar -x -C DIR`): each scaling "
                        "run also runs with its generate.sh, in turn with this tree's, for a comparison in one run")
    parser.add_argument("--json", default="bench/out/multi_gpu.json", help="where the results are written")
    args = parser.parse_args()
    args.processes = [int(p) for p in args.processes.split(",")]
    args.gpus = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                   capture_output=True, text=True).stdout or 0)
    result = dict(gpus=args.gpus)
    with tempfile.TemporaryDirectory() as tmp:
        if args.real_size:
            models = real_size_models(args.captioner, Path(args.real_size), result)
            result["scaling"] = scaling(args, args.captioner, models, Path(tmp) / "scaling")
        if args.checks:
            os.makedirs(Path(tmp) / "checks")
            result["checks"] = checks(args, Path(tmp) / "checks")
    print(json.dumps(result, indent=1))
    for row in result.get("scaling", []):
        print(f"{args.captioner}, {summary_line(row)}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
