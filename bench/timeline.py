"""Timeline profile of consecutive steady-state batches of our loop (bench/throughput.py --profile DIR).

`BatchProfile` wraps the captioner's caption(): each call is the range "bench: caption()", and the torch
profiler (CPU and CUDA) runs from the start of batch warmup + 1 to the start of the batch after the profiled
ones, so the window holds whole batches with the loop's own work between them (waiting on the data loader
workers, writing). The chrome trace goes to trace.json.gz in the given folder (trimmed to under 15 MiB), the
analysis to timeline.json, and a table is printed:

- per batch: wall time, GPU busy time (union of kernel, memcpy and memset intervals) and its share of wall time;
- phases: CPU wall time on the main thread, attributed to the innermost "bench: ..." range (bench/instrument.py)
  or the data loader's own range, and GPU kernel time attributed to the phase whose CPU launched it (CUDA
  graph kernels to their cudaGraphLaunch);
- the largest gaps between GPU work, with the phase and the innermost CPU operations at the time;
- host-to-device and device-to-host copies, and the CUDA runtime calls where the CPU spent most time.
"""
import bisect
import gzip
import json
import os
import tempfile
from collections import Counter

from torch.profiler import ProfilerActivity, profile, record_function

from bench.instrument import PREFIX

BATCH = PREFIX + "caption()"
END = PREFIX + "end of profile window"
LOADER = "enumerate(DataLoader)"
GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_CATEGORIES = {"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"}
LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}
MAX_TRACE_BYTES = 15 * 2 ** 20
OUTSIDE = "loop, outside caption() (windows, writing)"
CAPTION_REST = "caption(), rest (inputs, tokenizer, text)"
SETUP = "generate(): setup before prefill (cache, inputs)"
DECODE_REST = "decode: rest (graph replays, generate loop)"


class BatchProfile:
    """caption() wrapper (for instrument.patched) that profiles `batches` consecutive calls after `warmup`."""

    def __init__(self, warmup, batches, device):
        self.warmup, self.batches, self.calls = warmup, batches, 0
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = None
        self.finished = False

    def __call__(self, caption):
        def profiled_caption(*args, **kwargs):
            if self.calls == self.warmup:
                self.profiler = profile(activities=self.activities)
                self.profiler.start()
            elif self.calls == self.warmup + self.batches:
                self.stop()
            self.calls += 1
            with record_function(BATCH):
                return caption(*args, **kwargs)
        return profiled_caption

    def stop(self):
        """End the window (at the start of the next batch, or after the run when it had no more batches)."""
        if self.profiler is not None and not self.finished:
            with record_function(END):
                pass
            self.profiler.stop()
            self.finished = True

    def report(self, folder):
        """Write the trace and the analysis to `folder`, print the table; returns the analysis."""
        self.stop()
        if self.profiler is None:
            print(f"profile: only {self.calls} batches, none after the {self.warmup} warm-up batches", flush=True)
            return None
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.profiler.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json")) as f:
                trace = json.load(f)
        analysis = analyse(trace["traceEvents"])
        analysis["trace"] = write_trace(trace, os.path.join(folder, "trace.json.gz"))
        with open(os.path.join(folder, "timeline.json"), "w") as f:
            json.dump(analysis, f, indent=1)
        print_analysis(analysis)
        return analysis


# ------------------------------------------------------------------------------------------- intervals

def union(intervals):
    """Sorted, disjoint [start, end] covering the given intervals."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def covered(intervals, start, end):
    """Length of [start, end] covered by sorted, disjoint intervals."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals if a < end and b > start)


def complement(intervals, start, end):
    """The parts of [start, end] that the sorted, disjoint intervals leave free."""
    free, cursor = [], start
    for a, b in intervals:
        if b <= cursor:
            continue
        if a >= end:
            break
        if a > cursor:
            free.append([cursor, a])
        cursor = max(cursor, b)
    if cursor < end:
        free.append([cursor, end])
    return free


def innermost(events):
    """[(start, end, event)]: the innermost of one thread's nested events at each moment (none where none is)."""
    segments, stack, cursor = [], [], float("-inf")
    for event in sorted(events, key=lambda e: (e["ts"], -e["dur"])) + [None]:
        time = float("inf") if event is None else event["ts"]
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= time:  # close what ended before this event
            top = stack.pop()
            top_end = top["ts"] + top["dur"]
            if top_end > cursor:
                segments.append((cursor, top_end, top))
                cursor = top_end
        if event is None:
            return segments
        if stack and time > cursor:
            segments.append((cursor, time, stack[-1]))
        stack.append(event)
        cursor = max(cursor, time)


class Segments:
    """Labelled, sorted, disjoint segments of time, looked up by overlap."""

    def __init__(self, segments):
        self.segments = segments
        self.starts = [s[0] for s in segments]

    def overlaps(self, start, end):
        """{label: time} of the segments within [start, end]."""
        found = Counter()
        for index in range(max(bisect.bisect_right(self.starts, start) - 1, 0), len(self.segments)):
            a, b, label = self.segments[index]
            if a >= end:
                break
            if b > start:
                found[label] += min(b, end) - max(a, start)
        return found

    def at(self, time, default):
        index = bisect.bisect_right(self.starts, time) - 1
        if index >= 0 and self.segments[index][1] > time:
            return self.segments[index][2]
        return default


# ------------------------------------------------------------------------------------------- analysis

def phase_segments(main_events):
    """Main-thread time labelled by phase: the innermost bench or data loader range, with generate()'s own time
    split at its prefill into setup and decoding."""
    ranges = [e for e in main_events if e["cat"] == "user_annotation"
              and (e["name"].startswith(PREFIX) or e["name"].startswith(LOADER)) and e["name"] != END]
    prefill_starts = sorted(e["ts"] for e in ranges if e["name"] == PREFIX + "LLM prefill")
    labelled = []
    for start, end, event in innermost(ranges):
        name = event["name"]
        if name.startswith(LOADER):
            label = "waiting on data loader workers"
        elif name == BATCH:
            label = CAPTION_REST
        elif name == PREFIX + "generate":
            index = bisect.bisect_left(prefill_starts, event["ts"])
            before_prefill = index < len(prefill_starts) and end <= prefill_starts[index] <= event["ts"] + event["dur"]
            label = SETUP if before_prefill else DECODE_REST
        else:
            label = name[len(PREFIX):]
        labelled.append((start, end, label))
    return Segments(labelled)


def main_thread(events):
    batch = next(e for e in events if e.get("cat") == "user_annotation" and e["name"] == BATCH)
    return batch["pid"], batch["tid"]


def analyse(trace_events):
    """The numbers of the table (times in milliseconds) from a chrome trace's events."""
    events = [e for e in trace_events if e.get("ph") == "X" and "dur" in e]
    thread = main_thread(events)
    main = [e for e in events if (e["pid"], e["tid"]) == thread and e.get("cat") in CPU_CATEGORIES]
    starts = sorted(e["ts"] for e in main if e["name"] == BATCH and e["cat"] == "user_annotation")
    ends = [e["ts"] for e in main if e["name"] == END]
    window_end = ends[0] if ends else max(e["ts"] + e["dur"] for e in main)
    bounds = list(zip(starts, starts[1:] + [window_end]))
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES and starts[0] <= e["ts"] < window_end]
    busy = union([e["ts"], e["ts"] + e["dur"]] for e in gpu)
    phases = phase_segments(main)
    ops = Segments([(a, b, e["name"]) for a, b, e in innermost(main)])
    return dict(batches=batch_rows(bounds, busy, phases, gpu),
                phases=phase_rows(bounds, phases, gpu, events),
                gaps=gap_rows(bounds, busy, phases, ops),
                copies=copy_rows(gpu), runtime=runtime_rows(main),
                top_kernels=top_kernels(gpu))


def batch_rows(bounds, busy, phases, gpu):
    rows = []
    copies = union([e["ts"], e["ts"] + e["dur"]] for e in gpu if "HtoD" in e["name"])
    for start, end in bounds:
        spent = phases.overlaps(start, end)
        gpu_busy = covered(busy, start, end)
        rows.append(dict(wall_ms=ms(end - start), gpu_busy_ms=ms(gpu_busy),
                         gpu_busy_share=round(gpu_busy / (end - start), 3),
                         loader_wait_ms=ms(spent["waiting on data loader workers"]),
                         prefill_ms=ms(spent["LLM prefill"]),
                         decode_ms=ms(sum(t for label, t in spent.items() if label.startswith("decode"))),
                         host_to_device_ms=ms(covered(copies, start, end))))
    return rows


def phase_rows(bounds, phases, gpu, events):
    """Per phase, per batch on average: CPU wall time on the main thread, and GPU time of the kernels it launched."""
    start, end = bounds[0][0], bounds[-1][1]
    wall = phases.overlaps(start, end)
    wall[OUTSIDE] = (end - start) - sum(wall.values())
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    gpu_time = Counter()
    for kernel in gpu:
        launched = launches.get(kernel.get("args", {}).get("correlation"))
        label = "(launch not in the trace)" if launched is None else phases.at(launched, OUTSIDE)
        gpu_time[label] += kernel["dur"]
    count = len(bounds)
    return [dict(phase=label, cpu_wall_ms=ms(wall[label] / count), gpu_kernel_ms=ms(gpu_time[label] / count))
            for label in sorted(set(wall) | set(gpu_time), key=lambda k: -(wall[k] + gpu_time[k]))]


def gap_rows(bounds, busy, phases, ops, top=10):
    """The largest stretches without GPU work, and where the CPU was in them."""
    gaps = complement(busy, bounds[0][0], bounds[-1][1])
    by_phase, by_op = Counter(), Counter()
    for a, b in gaps:
        by_phase.update(phases.overlaps(a, b))
        by_op.update(ops.overlaps(a, b))
    total = sum(b - a for a, b in gaps)
    by_phase[OUTSIDE] += total - sum(by_phase.values())
    largest = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        batch = bisect.bisect_right([s for s, _ in bounds], a) - 1
        largest.append(dict(ms=ms(b - a), batch=batch, at_ms=ms(a - bounds[batch][0]),
                            phase=(phases.overlaps(a, b).most_common(1) or [(OUTSIDE, 0)])[0][0],
                            cpu=[(name, ms(t)) for name, t in ops.overlaps(a, b).most_common(3)]))
    return dict(total_ms=ms(total), count=len(gaps), largest=largest,
                by_phase=[(label, ms(t)) for label, t in by_phase.most_common() if t > 0],
                cpu_ops=[(name, ms(t)) for name, t in by_op.most_common(10)])


def copy_rows(gpu):
    rows = {}
    for direction in ("HtoD", "DtoH", "DtoD"):
        copies = [e for e in gpu if e["cat"] == "gpu_memcpy" and direction in e["name"]]
        rows[direction] = dict(count=len(copies), ms=ms(sum(e["dur"] for e in copies)),
                               mib=round(sum(e.get("args", {}).get("bytes", 0) for e in copies) / 2 ** 20, 1))
    return rows


def runtime_rows(main, top=8):
    """CUDA runtime calls on the main thread by total time: launches, synchronisations, copies."""
    total, count = Counter(), Counter()
    for e in main:
        if e["cat"] in LAUNCH_CATEGORIES:
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    return [(name, count[name], ms(t)) for name, t in total.most_common(top)]


def top_kernels(gpu, top=8):
    total = Counter()
    for e in gpu:
        total[e["name"]] += e["dur"]
    return [(name[:90], ms(t)) for name, t in total.most_common(top)]


def ms(microseconds):
    return round(microseconds / 1000, 2)


# ------------------------------------------------------------------------------------------- output

TRIM_THRESHOLDS_US = (5, 20, 100, 500, 2000, float("inf"))
SLIM_KEYS = ("ph", "cat", "name", "pid", "tid", "ts", "dur")


def write_trace(trace, path):
    """Write the trace gzipped. Over MAX_TRACE_BYTES, CPU events shorter than a threshold and the flow arrows are
    left out (GPU events and bench ranges are kept): the threshold whose event count should fit, from the bytes per
    event of the last attempt, raised until the file fits; at the last one, GPU events also lose their details."""
    events, threshold = trace["traceEvents"], 0
    data = gzip.compress(json.dumps(trace).encode())
    kept = len(events)
    while len(data) > MAX_TRACE_BYTES and threshold < float("inf"):
        fitting = kept * MAX_TRACE_BYTES / len(data) * 0.9
        threshold = next((t for t in TRIM_THRESHOLDS_US if t > threshold
                          and sum(keep(e, t) for e in events) <= fitting), float("inf"))
        trimmed = [slim(e) if threshold == float("inf") else e for e in events if keep(e, threshold)]
        kept = len(trimmed)
        data = gzip.compress(json.dumps({**trace, "traceEvents": trimmed}).encode())
    with open(path, "wb") as f:
        f.write(data)
    return dict(path=path, mib=round(len(data) / 2 ** 20, 2), cpu_events_shorter_than_us_left_out=threshold)


def keep(event, threshold):
    if event.get("ph") in ("s", "f", "t"):  # flow arrows from launches to kernels
        return False
    if event.get("ph") != "X" or event.get("cat") in GPU_CATEGORIES or event.get("cat") == "gpu_user_annotation":
        return True
    if event.get("cat") == "user_annotation" and event["name"].startswith((PREFIX, LOADER)):
        return True
    return event.get("dur", 0) >= threshold


def slim(event):
    return {key: event[key] for key in SLIM_KEYS if key in event} if event.get("cat") in GPU_CATEGORIES else event


def print_analysis(analysis):
    print("\nprofiled batches (ms):")
    print(f"  {'batch':>5} {'wall':>9} {'GPU busy':>9} {'busy %':>6} {'loader':>8} {'prefill':>8} {'decode':>8} "
          f"{'H2D':>7}")
    for i, r in enumerate(analysis["batches"]):
        print(f"  {i:5d} {r['wall_ms']:9.1f} {r['gpu_busy_ms']:9.1f} {r['gpu_busy_share'] * 100:5.1f}% "
              f"{r['loader_wait_ms']:8.1f} {r['prefill_ms']:8.1f} {r['decode_ms']:8.1f} {r['host_to_device_ms']:7.1f}")
    print("phases, per batch (CPU wall on the main thread; GPU time of the kernels launched there), ms:")
    for r in analysis["phases"]:
        print(f"  {r['phase']:58} {r['cpu_wall_ms']:9.1f} {r['gpu_kernel_ms']:9.1f}")
    gaps = analysis["gaps"]
    print(f"GPU idle: {gaps['total_ms']:.1f} ms in {gaps['count']} gaps; by phase: "
          + ", ".join(f"{label} {t:.1f}" for label, t in gaps["by_phase"][:6]))
    print("  innermost CPU operations during the gaps (ms): "
          + ", ".join(f"{name} {t:.1f}" for name, t in gaps["cpu_ops"]))
    print("  largest gaps:")
    for g in gaps["largest"]:
        cpu = "; ".join(f"{name} {t:.1f}" for name, t in g["cpu"])
        print(f"    {g['ms']:8.2f} ms  batch {g['batch']} +{g['at_ms']:.1f} ms  [{g['phase']}]  {cpu}")
    print("copies: " + ", ".join(f"{d} {c['count']} x, {c['ms']:.1f} ms, {c['mib']:.1f} MiB"
                                 for d, c in analysis["copies"].items()))
    print("CUDA runtime on the main thread (calls, ms): "
          + ", ".join(f"{name} {n} {t:.1f}" for name, n, t in analysis["runtime"]))
    print("top kernels (ms): " + "; ".join(f"{name} {t:.1f}" for name, t in analysis["top_kernels"]))
    print(f"trace: {analysis['trace']['path']} ({analysis['trace']['mib']} MiB)", flush=True)
