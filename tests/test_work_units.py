"""Work units from any indexed scheduler and one writer per file (issue 26), through the real scripts: qwen.py and
generate.sh on the tiny Qwen2-VL checkpoint, with the variables SLURM arrays, AWS Batch arrays and Kubernetes
Indexed Jobs set (tests/test_slurm.py runs a real SLURM)."""
import json
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import (REPO, command_env, generate_qwen, one_process_captions, qwen_caption_files, qwen_captions,
                      run_command)
from sample_images import write_pattern_images

COUNT = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pattern_images(tmp_path_factory.mktemp("units-dataset"), COUNT, seed=300)[0]


@pytest.fixture(scope="module")
def reference(qwen_checkpoint, dataset, tmp_path_factory):
    return one_process_captions(generate_qwen(qwen_checkpoint, dataset, tmp_path_factory.mktemp("units-reference")),
                                COUNT)


ARRAYS = {
    "slurm": lambda i: {"SLURM_ARRAY_TASK_ID": str(i + 5), "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3",
                        "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
    "aws": lambda i: {"AWS_BATCH_JOB_ARRAY_INDEX": str(i), "AWS_BATCH_JOB_ARRAY_SIZE": "3"},
    "kubernetes": lambda i: {"JOB_COMPLETION_INDEX": str(i)},
}


def start(checkpoint, input_file, out, env, *extra):
    return subprocess.Popen(generate_qwen(checkpoint, input_file, out, *extra), cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env=command_env(env))


def test_array_tasks_each_caption_their_own_part(qwen_checkpoint, dataset, reference, tmp_path):
    """Three SLURM array tasks (indices 5 to 7), two at a time as a throttled array runs them: each captions its part
    into files of its own, every image once; a rerun with another part count finds everything done."""
    out = tmp_path / "out"
    tasks = [start(qwen_checkpoint, dataset, out, ARRAYS["slurm"](i)) for i in range(2)]
    statuses = [task.wait(timeout=300) for task in tasks]
    tasks.append(start(qwen_checkpoint, dataset, out, ARRAYS["slurm"](2)))
    statuses.append(tasks[-1].wait(timeout=300))
    assert statuses == [0, 0, 0], [task.stderr.read() for task in tasks]
    assert sorted(qwen_caption_files(out)) == [f"captions-0000{i}-of-00003.jsonl" for i in range(3)]
    assert qwen_captions(out) == reference
    for part in ("0/2", "1/2"):
        rerun = run_command(generate_qwen(qwen_checkpoint, dataset, out, "--part", part))
        assert "0 to caption" in rerun.stderr
    assert qwen_captions(out) == reference


@pytest.mark.parametrize("scheduler", ["aws", "kubernetes"])
def test_other_schedulers_name_the_same_part(qwen_checkpoint, dataset, reference, tmp_path, scheduler):
    """AWS Batch's index of its array size, and Kubernetes' completion index with --parts, give the part that SLURM's
    array task gives: the last third of the input."""
    out = tmp_path / "out"
    extra = ["--parts", "3"] if scheduler == "kubernetes" else []
    task = start(qwen_checkpoint, dataset, out, ARRAYS[scheduler](2), *extra)
    assert task.wait(timeout=300) == 0, task.stderr.read()
    files = qwen_caption_files(out)
    assert list(files) == ["captions-00002-of-00003.jsonl"]
    names = [entry["image"] for entry in json.loads(dataset.read_text())]
    assert sorted(row["image"] for row in files["captions-00002-of-00003.jsonl"]) == sorted(names[8:])


def test_kubernetes_index_without_a_count_is_one_line(qwen_checkpoint, dataset, tmp_path):
    result = run_command(generate_qwen(qwen_checkpoint, dataset, tmp_path / "out"), check=False,
                         env={"JOB_COMPLETION_INDEX": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "give --parts K" in lines[0], result.stderr


def test_an_array_task_with_several_processes_splits_its_part(qwen_checkpoint, dataset, reference, tmp_path):
    """--part 1/2 on two processes (NUM_GPUS=2): ranks 2 and 3 of 4; then part 0 alone; every image once."""
    out = tmp_path / "out"
    run_command(generate_qwen(qwen_checkpoint, dataset, out, "--part", "1/2"), env={"NUM_GPUS": "2"})
    assert sorted(qwen_caption_files(out)) == ["captions-00002-of-00004.jsonl", "captions-00003-of-00004.jsonl"]
    run_command(generate_qwen(qwen_checkpoint, dataset, out, "--part", "0/2"))
    assert qwen_captions(out) == reference


def test_a_second_writer_stops_before_the_model_loads(qwen_checkpoint, dataset, reference, tmp_path):
    """The same part started twice: the second stops in one line naming the file and the first process; once the
    first is killed (kill -9), its lock is gone and a rerun completes the part exactly once."""
    out = tmp_path / "out"
    flags = generate_qwen(qwen_checkpoint, dataset, out, "--batch-size", "1")[4:]
    first = subprocess.Popen([sys.executable, "qwen.py", *flags, "--input-json", str(dataset)], cwd=REPO,
                             stderr=subprocess.PIPE, text=True, env=command_env({}))
    deadline = time.time() + 120
    while time.time() < deadline and not qwen_caption_files(out):  # the first holds its lock from before the load
        time.sleep(0.02)
    try:
        second = run_command(generate_qwen(qwen_checkpoint, dataset, out), check=False)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "captions-00000-of-00001.jsonl is being written by process" in lines[0], second.stderr
    assert f"process {first.pid} on this host" in lines[0]
    assert "Loading" not in second.stderr
    run_command(generate_qwen(qwen_checkpoint, dataset, out))
    assert qwen_captions(out) == reference
    assert max(Counter(image for image, _ in qwen_captions(out)).values()) == 1
