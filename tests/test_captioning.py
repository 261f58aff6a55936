"""The shared loop through a real script (qwen.py on a tiny checkpoint): sharding, resume, signals, errors."""
import argparse
import json
import multiprocessing
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import REPO, read_jsonl, run_command
from sample_images import write_pattern_images

from utils.batch_runner import BatchRunner
from utils.batcher import Batcher, OnSecondThread
from utils.captioner import Caption, Captioner
from utils.image_workers import prepared_windows

COUNT = 30


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pattern_images(tmp_path_factory.mktemp("dataset"), COUNT, seed=100)


def command(checkpoint, input_file, out, *extra):
    return ["python", "qwen.py", "--input-json", str(input_file), "--model", checkpoint, "--output-dir", str(out),
            "--max-new-tokens", "6", "--temperature", "0", "--num-workers", "0", *extra]


def all_rows(out):
    """Every caption line of every rank file, as (image, caption)."""
    return sorted((row["image"], row["caption"])
                  for path in sorted((out / "qwen").glob("*/default/captions-*.jsonl")) for row in read_jsonl(path))


@pytest.fixture(scope="module")
def uninterrupted(qwen_checkpoint, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_command(command(qwen_checkpoint, dataset[0], out, "--batch-size", "4"))
    rows = all_rows(out)
    assert [image for image, _ in rows] == sorted(dataset[1])
    return rows


def interrupt(args, out, sig):
    """Start a run, send `sig` once its first batch is on disk, and wait for it to end."""
    process = subprocess.Popen([sys.executable, *args[1:]], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if any(path.stat().st_size for path in out.glob("qwen/*/default/captions-*.jsonl")):
            process.send_signal(sig)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_interrupted_run_resumes_to_the_same_output(qwen_checkpoint, dataset, uninterrupted, tmp_path, sig):
    out = tmp_path / "out"
    args = command(qwen_checkpoint, dataset[0], out, "--batch-size", "1")
    returncode, stderr = interrupt(args, out, sig)
    assert returncode == (-9 if sig == signal.SIGKILL else 128 + signal.SIGTERM), stderr
    partial = all_rows(out)
    assert 0 < len(partial) < COUNT, "the run was not interrupted mid-way"
    if sig == signal.SIGTERM:
        assert "stopped by SIGTERM" in stderr and "run the same command again to resume" in stderr
    resumed = run_command(args)
    assert f"{len(partial)} already done" in resumed.stderr
    assert all_rows(out) == uninterrupted


def test_partial_last_line_is_cut_and_its_image_captioned_again(qwen_checkpoint, dataset, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run_command(command(qwen_checkpoint, dataset[0], out, "--batch-size", "4", "--limit", "5"))
    captions = next(out.glob("qwen/*/default/captions-00000-of-00001.jsonl"))
    lines = captions.read_text().splitlines(keepends=True)
    captions.write_text("".join(lines[:4]) + lines[4][:25])  # as if killed while writing the fifth line
    run_command(command(qwen_checkpoint, dataset[0], out, "--batch-size", "4"))
    assert all(line.endswith("\n") for line in captions.read_text().splitlines(keepends=True))
    assert all_rows(out) == uninterrupted


def test_two_processes_split_the_work_and_resume_across_world_sizes(
        qwen_checkpoint, dataset, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run_command(command(qwen_checkpoint, dataset[0], out, "--batch-size", "3", "--limit", "7"))
    launch = ["bash", "generate.sh", str(dataset[0]), "qwen"] + command(qwen_checkpoint, dataset[0], out)[4:]
    run_command(launch + ["--batch-size", "3", "--numgpus", "2"], env={"NUM_GPUS": "2"})
    model_dir = next((out / "qwen").iterdir())
    first = [row["image"] for row in read_jsonl(model_dir / "default" / "captions-00000-of-00001.jsonl")]
    rank0 = [row["image"] for row in read_jsonl(model_dir / "default" / "captions-00000-of-00002.jsonl")]
    rank1 = [row["image"] for row in read_jsonl(model_dir / "default" / "captions-00001-of-00002.jsonl")]
    names = json.loads(dataset[0].read_text())
    # Part r of n takes [r*30//n, (r+1)*30//n): rank 0 the first half, rank 1 the rest; the seven done before are
    # skipped.
    # (Within a file, lines come sorted by prompt length per --sort-window, not in input order.)
    assert sorted(first) == sorted(entry["image"] for entry in names[:7])
    assert sorted(rank0) == sorted(entry["image"] for entry in names[7:COUNT // 2])
    assert sorted(rank1) == sorted(entry["image"] for entry in names[COUNT // 2:])
    assert all_rows(out) == uninterrupted


def test_overwrite_starts_afresh(qwen_checkpoint, dataset, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run_command(command(qwen_checkpoint, dataset[0], out, "--batch-size", "8", "--limit", "4"))
    captions = next(out.glob("qwen/*/default/captions-00000-of-00001.jsonl"))
    rows = read_jsonl(captions)
    captions.write_text("".join(json.dumps({**row, "caption": "stale"}) + "\n" for row in rows))
    run_command(command(qwen_checkpoint, dataset[0], out, "--batch-size", "8", "--limit", "4", "--overwrite"))
    first_four = {entry["image"] for entry in json.loads(dataset[0].read_text())[:4]}
    assert all_rows(out) == [row for row in uninterrupted if row[0] in first_four]


@pytest.mark.parametrize("content, problem", [
    ("hello world", "not JSON or JSONL"),
    ("[1, 2]", "entry 0 is not an object"),
    ('[{"image": "a.png"}, {"path": "b.png"}]', 'entry 1 has no "image" path'),
    ('[{"image": "a.png"}, {"image": "b.png"', "not valid JSON at element 1 (cut off?)"),
    ('{"image": "a.png"}\n{"image": }\n', ":2: not valid JSON"),
    ("", "the file is empty"),
])
def test_malformed_input_gives_one_clear_line(qwen_checkpoint, tmp_path, content, problem):
    input_file = tmp_path / "input.json"
    input_file.write_text(content)
    result = run_command(["bash", "generate.sh", str(input_file), "qwen", "--model", qwen_checkpoint], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(input_file) in lines[0] and problem in lines[0], result.stderr


@pytest.mark.parametrize("args, problem", [
    (["input.json", "blip"], "unknown model 'blip'"),
    (["nowhere.json", "qwen"], "nowhere.json: no such file"),
    (["input.json", "qwen", "--numgpus", "4"], "--numgpus 4 but 1 process"),
    (["input.json", "qwen", "--prompts", "detail"], "unknown preset 'detail'"),
])
def test_command_mistakes_give_one_clear_line(dataset, args, problem):
    args = [str(dataset[0]) if arg == "input.json" else arg for arg in args]
    result = run_command(["bash", "generate.sh", *args], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], result.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_the_first_window_is_one_batch_and_later_ones_read_ahead(dataset, workers):
    """The model starts as soon as one batch is prepared; later windows hold --sort-window batches; every image
    comes once, with its index."""
    folder = dataset[0].parent
    pending = [(name, None, ["default"]) for name in dataset[1]]
    args = argparse.Namespace(batch_size=4, sort_window=3, num_workers=workers)
    windows = list(prepared_windows(pending, str(folder), _image_size, args))
    assert [len(window) for window in windows] == [4, 12, 12, 2]
    assert sorted(index for window in windows for index, _, _ in window) == list(range(COUNT))
    assert all(error is None and size == (40 + 7 * (index % 5), 40 + 5 * (index % 3))
               for window in windows for index, size, error in window)


def test_the_image_workers_start_before_prepared_windows_returns(dataset):
    """The loop compiles on another thread right after this call (utils/caption_loop.py): the workers must be
    forked by then, not later on the batcher thread while that thread works."""
    folder = dataset[0].parent
    pending = [(name, None, ["default"]) for name in dataset[1]]
    before = set(multiprocessing.active_children())
    windows = prepared_windows(pending, str(folder), _image_size, argparse.Namespace(batch_size=4, sort_window=3,
                                                                                     num_workers=2))
    assert len(set(multiprocessing.active_children()) - before) == 2
    assert sum(len(window) for window in windows) == COUNT


def _image_size(image):  # a picklable `prepare` for the worker processes
    return image.size


def test_the_batcher_thread_runs_ahead_hands_over_in_order_and_closes():
    """Items come in order; the generator makes the next one while the caller holds this one; its error reaches
    the caller after the items before it; close() ends the generator early (its finally runs) and the thread."""
    second_made = threading.Event()

    def counting(error_after=None, closed=None):
        try:
            for number in range(5):
                if number == error_after:
                    raise ValueError("broken shard")
                if number == 1:
                    second_made.set()
                yield number
        finally:
            if closed is not None:
                closed.set()

    items = iter(OnSecondThread(counting()))
    assert next(items) == 0
    assert second_made.wait(10)  # made while the caller still holds item 0
    assert list(items) == [1, 2, 3, 4]

    received = []
    with pytest.raises(ValueError, match="broken shard"):
        for number in OnSecondThread(counting(error_after=2)):
            received.append(number)
    assert received == [0, 1]

    closed = threading.Event()
    early = OnSecondThread(counting(closed=closed))
    assert next(iter(early)) == 0
    early.close()
    assert closed.is_set() and not early.thread.is_alive()


class ImageSizeCaptioner(Captioner):
    """Not a model: a captioner whose captions are the images' sizes, which runs out of CUDA memory on batches
    of more than two images, and counts its cpu_inputs() calls, to test the loop's batching."""

    def __init__(self):
        self.inputs_made, self.batch_sizes, self.out_of_memory = [], [], []

    def cost(self, size):
        return size[0]

    def cpu_inputs(self, images, prompts):
        self.inputs_made.append(len(images))
        return list(images)

    def caption(self, images, prompts, inputs):
        import torch
        assert inputs == images
        if len(images) > 2:
            self.out_of_memory.append(len(images))
            raise torch.cuda.OutOfMemoryError("test")
        self.batch_sizes.append(len(images))
        return [[Caption(f"{size} {prompt}", False) for prompt in prompts] for size in images]


class LineRecorder:
    """Not the writer: keeps what the loop hands to the writer, and ignores progress."""

    def __init__(self):
        self.batches, self.errors = [], []

    def write_captions(self, entries, keys, results):
        self.batches.append((entries, keys, results))

    def write_errors(self, entries_and_errors):
        self.errors += entries_and_errors

    def update(self, count):
        pass


def test_batches_formed_ahead_are_cut_to_the_size_an_out_of_memory_retry_lowered():
    """Batches of 4 are formed ahead on the batcher's thread; the first runs out of memory and is retried in
    halves, and the batches already formed go in batches of 2 too: every image once, each caption its own."""
    captioner, writer = ImageSizeCaptioner(), LineRecorder()
    prompts = {"a": "first", "b": "second"}
    sizes = [(40 + index % 7, 30) for index in range(11)]
    pending = [(f"{index}.png", None, ["a", "b"] if index % 3 else ["a"]) for index in range(12)]
    window = [(index, size, None) for index, size in enumerate(sizes)] + [(11, None, "not an image file")]
    smaller_sizes = queue.SimpleQueue()
    batcher = Batcher(captioner, prompts, pending, 4, smaller_sizes)
    runner = BatchRunner(captioner, prompts, pending, writer, writer, "", [], 4, smaller_sizes)
    batches = list(OnSecondThread(batcher.batches([window])))
    assert [(len(batch.items), batch.errors) for batch in batches] == [
        (4, [(11, "not an image file")]), (4, []), (3, [])]
    assert captioner.inputs_made == [4, 4, 3]  # on the batcher's thread
    for batch in batches:
        runner.run(batch)
    assert captioner.out_of_memory == [4]  # once: the batches formed ahead are cut before they run
    assert runner.batch_size == 2 and captioner.batch_sizes == [2, 2, 2, 2, 2, 1]
    assert batcher.size_in_force() == 2  # the batcher was told, for the batches it forms next
    indexes_written = [pending.index(entry) for entries, _, _ in writer.batches for entry in entries]
    assert sorted(indexes_written) == list(range(11))
    for entries, keys, results in writer.batches:
        indexes = [pending.index(entry) for entry in entries]
        for index, row in zip(indexes, results):
            assert set(pending[index][2]) <= set(keys)
            assert [caption.text for caption in row] == [f"{sizes[index]} {prompts[key]}" for key in keys]
    assert writer.errors == [(pending[11], "not an image file")]


def test_a_misspelt_flag_answers_in_one_line_with_a_suggestion():
    result = run_command(["python", "qwen.py", "--batchsize", "4"], check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batchsize" in lines[0] and "did you mean --batch-size?" in lines[0], result.stderr


def test_default_workers_fit_the_cores_and_die_with_their_parent(qwen_checkpoint, tmp_path):
    """Without --num-workers the loader starts no more workers than the cores allow (torch warns otherwise); after
    kill -9 of the main process its image workers, busy with large images, end at once rather than at their next
    check of the parent (seconds later)."""
    rng = np.random.default_rng(0)
    for index in range(16):
        Image.fromarray(rng.integers(0, 255, (1500, 1500, 3), dtype=np.uint8)).save(tmp_path / f"{index}.jpg")
    (tmp_path / "input.json").write_text(json.dumps([{"image": f"{index}.jpg"} for index in range(16)]))
    out = tmp_path / "out"
    args = command(qwen_checkpoint, tmp_path / "input.json", out, "--batch-size", "1")
    args = args[:args.index("--num-workers")] + args[args.index("--num-workers") + 2:]
    process = subprocess.Popen([sys.executable, *args[1:]], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(path.stat().st_size for path in out.glob("qwen/*/default/captions-*")):
        time.sleep(0.02)
    workers = children_of(process.pid)
    assert workers, "the run started no image workers"
    process.kill()
    _, stderr = process.communicate(timeout=60)
    assert "suggested max number of worker" not in stderr
    deadline = time.time() + 2
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)


def children_of(pid):
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"  # a zombie has ended; only its parent's wait is missing
