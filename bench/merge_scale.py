"""Benchmark the merge scripts on synthetic data: rows/s and peak RSS.

    python -m bench.merge_scale --rows 1000000 --indexes 5

Makes, in --workdir, an original JSONL of N rows and K caption folders of per-rank captions files
(our captioning output format, rows shuffled across 8 ranks, captions of 10 to 80 words in
sentences of 6 to 15 words), then runs as a user would, each under /usr/bin/time -v when it exists:
  1. utils/merge.py on all K folders (K*N rows) -> composed.jsonl + composed_index.json each;
  2. utils/merge_multi_caption.py --original ... --index ... (half of the indexes given as
     composed_index.json, the rest as folders, i.e. composed.jsonl);
  3. with --qa, step 2 again with --qa-report.
Prints a table and writes JSON (--json).
"""
import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = 8
POOL = 20011  # distinct captions to draw from (a prime, so (a*i + b) % POOL spreads well)


def make_vocabulary(rng, size=3000):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(size)]


def make_pool(rng, vocabulary):
    """Captions of 10 to 80 words in sentences of 6 to 15 words."""
    pool = []
    for _ in range(POOL):
        words, sentences = rng.randint(10, 80), []
        while words > 0:
            n = min(words, rng.randint(6, 15))
            sentence = [rng.choice(vocabulary) for _ in range(n)]
            sentences.append(" ".join(sentence).capitalize() + ".")
            words -= n
        pool.append(" ".join(sentences))
    return pool


def image_path(i):
    return f"/data/cc12m/images/{i // 10000:05d}/{i:09d}.jpg"


def coprime_step(n):
    """A step a with gcd(a, n) = 1, so i -> (a*i + b) % n is a shuffle that needs no memory."""
    a = int(n * 0.6180339887) | 1
    while gcd(a, n) != 1:
        a += 2
    return a


def gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def make_data(workdir, rows, indexes, seed, direct):
    marker = os.path.join(workdir, "done.json")
    wanted = {"rows": rows, "indexes": indexes, "seed": seed, "direct": direct}
    if os.path.exists(marker) and json.load(open(marker)) == wanted:
        return
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    rng = random.Random(seed)
    pool = make_pool(rng, make_vocabulary(rng))
    encode = json.encoder.encode_basestring
    with open(os.path.join(workdir, "original.jsonl"), "w") as f:
        for i in range(rows):
            f.write(f'{{"image": {encode(image_path(i))}, "caption": {encode(pool[(i * 7 + 3) % POOL][:120])}}}\n')
    step = coprime_step(rows)
    for k in range(indexes):
        folder = os.path.join(workdir, "outputs", "model", "ckpt", f"prompt{k}")
        os.makedirs(folder)
        if direct:  # what merge.py would write, without the per-rank files
            write_composed(folder, k, rows, step, pool, encode)
            continue
        per_rank = -(-rows // RANKS)
        for rank in range(RANKS):
            with open(os.path.join(folder, f"captions-{rank:05d}-of-{RANKS:05d}.jsonl"), "w") as f:
                for j in range(rank * per_rank, min(rows, (rank + 1) * per_rank)):
                    i = (step * j + k) % rows  # every index in its own shuffled order
                    caption = pool[(i * 31 + k * 7919) % POOL]
                    f.write(f'{{"image": {encode(image_path(i))}, "caption": {encode(caption)}, '
                            f'"model": "model", "prompt": "prompt{k}", "truncated": false}}\n')
    json.dump(wanted, open(marker, "w"))


def write_composed(folder, k, rows, step, pool, encode):
    """Index k as composed_index.json (odd k) or composed.jsonl (even k)."""
    as_object = k % 2 == 1
    with open(os.path.join(folder, "composed_index.json" if as_object else "composed.jsonl"), "w") as f:
        f.write("{" if as_object else "")
        for j in range(rows):
            i = (step * j + k) % rows
            image, caption = encode(image_path(i)), encode(pool[(i * 31 + k * 7919) % POOL])
            if as_object:
                f.write(f"{', ' if j else ''}{image}: {caption}")
            else:
                f.write(f'{{"image": {image}, "caption": {caption}}}\n')
        f.write("}\n" if as_object else "")


def timed(command):
    """Run command; -> (wall seconds, CPU seconds (user + system, its worker processes included),
    peak RSS in MiB of the largest process), measured by /usr/bin/time -v when it exists."""
    use_time = os.path.exists("/usr/bin/time")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen((["/usr/bin/time", "-v"] if use_time else []) + command,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    tree_peak = [0]
    sampler = threading.Thread(target=sample_tree_rss, args=(process, tree_peak), daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode != 0:
        sys.exit(f"merge_scale.py: error: {' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    if use_time:
        field = lambda name: float(re.search(rf"{name}: ([\d.]+)", result.stderr).group(1))  # noqa: E731
        cpu = field(r"User time \(seconds\)") + field(r"System time \(seconds\)")
        peak_kib = field(r"Maximum resident set size \(kbytes\)")
    else:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        peak_kib = after.ru_maxrss  # the largest child so far
    return seconds, cpu, peak_kib / 1024, tree_peak[0] / 1024, result.stdout


def sample_tree_rss(process, peak):
    """Largest sum of the RSS of `process` and all its descendants (worker processes run at the
    same time, so the largest single process understates the memory used), every 0.1 s."""
    while process.poll() is None:
        parents, rss = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
                parents[int(pid)] = int(status["PPid"])
                rss[int(pid)] = int(status.get("VmRSS", "0 kB").split()[0])
            except (OSError, KeyError, ValueError):
                continue
        tree, grew = {process.pid}, True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        peak[0] = max(peak[0], sum(rss.get(pid, 0) for pid in tree))
        time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the original JSONL (default 1000000)")
    parser.add_argument("--indexes", type=int, default=5, help="generated caption sources (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "merge_scale"),
                        help="where the synthetic data and outputs go; data are reused when N, K and the seed "
                             "match (default: <system temp>/merge_scale)")
    parser.add_argument("--qa", action="store_true", help="also time merge_multi_caption.py with --qa-report")
    parser.add_argument("--skip-merge-py", action="store_true",
                        help="write the indexes directly as composed files and time only merge_multi_caption.py "
                             "(for sizes where the per-rank files and merge.py's outputs would not fit on disk)")
    parser.add_argument("--discard-output", action="store_true",
                        help="merge_multi_caption.py writes to /dev/null (saves disk for large N; rows are then "
                             "counted from its summary line)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: delete it at the end)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "merge_scale.json"),
                        help="where to write the results (default bench/out/merge_scale.json)")
    args = parser.parse_args()
    workdir = os.path.join(args.workdir, f"n{args.rows}-k{args.indexes}")

    start = time.perf_counter()
    make_data(workdir, args.rows, args.indexes, args.seed, args.skip_merge_py)
    print(f"merge_scale.py: data in {workdir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    python = sys.executable
    folders = [os.path.join(workdir, "outputs", "model", "ckpt", f"prompt{k}") for k in range(args.indexes)]
    indexes = [os.path.join(f, "composed_index.json") if k % 2 else f for k, f in enumerate(folders)]
    output = os.devnull if args.discard_output else os.path.join(workdir, "multi.jsonl")
    multi = [python, "utils/merge_multi_caption.py", "--original", os.path.join(workdir, "original.jsonl"),
             "--output", output, "--tmp-dir", workdir]
    for index in indexes:
        multi += ["--index", index]
    stages = [] if args.skip_merge_py else [
        ("merge.py", [python, "utils/merge.py", os.path.join(workdir, "outputs")], args.rows * args.indexes)]
    stages.append(("merge_multi_caption.py", multi, args.rows))
    if args.qa:
        stages.append(("merge_multi_caption.py --qa-report",
                       multi + ["--qa-report", os.path.join(workdir, "qa.json")], args.rows))
    results = []
    for name, command, rows in stages:
        load = os.getloadavg()[0]
        seconds, cpu, peak_mib, tree_mib, stdout = timed(command)
        if name.startswith("merge_multi_caption.py"):
            written = int(re.search(r"(\d+) written", stdout).group(1))
            if written != args.rows:
                sys.exit(f"merge_scale.py: error: merge_multi_caption.py wrote {written} rows, expected {args.rows}")
        results.append({"stage": name, "command": " ".join(command), "rows": rows, "seconds": round(seconds, 2),
                        "cpu_seconds": round(cpu, 2), "rows_per_s": round(rows / seconds),
                        "peak_rss_mib": round(peak_mib, 1), "peak_rss_all_processes_mib": round(tree_mib, 1),
                        "load_average_before": load})
        print(f"merge_scale.py: {name}: {seconds:.1f} s", file=sys.stderr)

    # Other people's jobs on the same cores stretch wall time; CPU seconds and the load average
    # before each stage tell how much.
    # Peak RSS: of the largest process (/usr/bin/time) and of all its processes together (sampled).
    print(f"{'stage':<36} {'rows':>9} {'wall s':>7} {'CPU s':>7} {'rows/s':>8} {'RSS MiB':>8} {'all MiB':>8} {'load':>5}")
    for r in results:
        print(f"{r['stage']:<36} {r['rows']:>9} {r['seconds']:>7.1f} {r['cpu_seconds']:>7.1f} {r['rows_per_s']:>8} "
              f"{r['peak_rss_mib']:>8.1f} {r['peak_rss_all_processes_mib']:>8.1f} {r['load_average_before']:>5.1f}")
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": args.rows, "indexes": args.indexes, "machine": machine, "results": results}, f, indent=1)
    print(f"merge_scale.py: results written to {args.json}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
