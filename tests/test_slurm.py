"""A real one-node SLURM (issue 26; `.ci/slurm-up` starts it): generate.sh under srun, a throttled job array with one
task cancelled mid-run and resubmitted alone, and scancel --signal=TERM of a running job then a rerun. Each ends with
every image captioned exactly once, as one process captions them."""
import shlex
import shutil
import subprocess
import time

import pytest
from conftest import REPO, command_env, generate_qwen, one_process_captions, qwen_caption_files, qwen_captions
from sample_images import write_pattern_images

COUNT = 32
TIMEOUT = 300


def slurm_problem():
    """Why SLURM cannot run jobs here, or None."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "SLURM is not installed (bash .ci/slurm-up installs and starts a one-node cluster as root)"
    try:
        nodes = subprocess.run(["sinfo", "--noheader", "--responding", "--format=%t"], capture_output=True, text=True,
                               timeout=30)
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer (bash .ci/slurm-up starts it)"
    if nodes.returncode != 0:
        return f"sinfo failed: {nodes.stderr.strip()} (bash .ci/slurm-up starts a one-node cluster)"
    if not {"idle", "mix", "alloc"} & set(nodes.stdout.split()):
        return f"no SLURM node is up (sinfo: {nodes.stdout.split()})"
    return None


SLURM_PROBLEM = slurm_problem()
pytestmark = pytest.mark.skipif(SLURM_PROBLEM is not None, reason=str(SLURM_PROBLEM))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pattern_images(tmp_path_factory.mktemp("slurm-dataset"), COUNT, seed=301)[0]


def generate(checkpoint, input_file, out, *extra):
    return generate_qwen(checkpoint, input_file, out, *extra, max_new_tokens=64)  # long enough to cancel mid-run


@pytest.fixture(scope="module")
def reference(qwen_checkpoint, dataset, tmp_path_factory):
    return one_process_captions(generate(qwen_checkpoint, dataset, tmp_path_factory.mktemp("slurm-reference")), COUNT)


def sbatch(tmp_path, command, *options):
    """Submit command as a batch job from the repository root; returns the job id."""
    script = tmp_path / f"job-{time.monotonic_ns()}.sh"
    script.write_text(f"#!/bin/bash\n{shlex.join(command)}\n")
    log = tmp_path / "slurm-%A_%a.out"
    result = subprocess.run(["sbatch", "--parsable", "--chdir", str(REPO), "--output", str(log), *options, str(script)],
                            capture_output=True, text=True, env=command_env({}), check=True)
    return result.stdout.strip().split(";")[0]


def wait_for(condition, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finished(job):
    """True once no task of job is pending or running in squeue."""
    queued = subprocess.run(["squeue", "--noheader", "--array", "--jobs", job, "--format=%i"], capture_output=True,
                            text=True)
    return (queued.returncode == 0 and not queued.stdout.strip()) or "Invalid job id" in queued.stderr


def lines_in(out, name="captions-*.jsonl"):
    """Whole lines written so far (read while a writer may be mid-line)."""
    return sum(path.read_bytes().count(b"\n") for path in out.glob(f"qwen/*/default/{name}"))


def job_logs(tmp_path):
    return "\n".join(f"--- {path.name}\n{path.read_text()}" for path in sorted(tmp_path.glob("slurm-*.out")))


def test_srun_two_tasks(qwen_checkpoint, dataset, reference, tmp_path):
    out = tmp_path / "out"
    subprocess.run(["srun", "--ntasks", "2", *generate(qwen_checkpoint, dataset, out)], cwd=REPO, env=command_env({}),
                   check=True, capture_output=True, timeout=TIMEOUT)
    assert sorted(qwen_caption_files(out)) == ["captions-00000-of-00002.jsonl", "captions-00001-of-00002.jsonl"]
    assert qwen_captions(out) == reference


def test_throttled_array_with_a_task_cancelled_and_resubmitted(qwen_checkpoint, dataset, reference, tmp_path):
    """--array=0-3%2: task 1 is cancelled once it has written a caption, the others finish; task 1 resubmitted
    alone (--array=1 with --parts 4) completes its part; every caption once."""
    out = tmp_path / "out"
    job = sbatch(tmp_path, generate(qwen_checkpoint, dataset, out, "--batch-size", "1"), "--array=0-3%2")
    wait_for(lambda: lines_in(out, "captions-00001-of-00004.jsonl") > 0 or finished(job), "task 1's first caption")
    subprocess.run(["scancel", f"{job}_1"], check=True)
    wait_for(lambda: finished(job), f"array job {job}")
    assert lines_in(out, "captions-00001-of-00004.jsonl") < COUNT // 4, "task 1 finished before it was cancelled"
    assert len(qwen_captions(out)) < COUNT
    rerun = sbatch(tmp_path, generate(qwen_checkpoint, dataset, out, "--parts", "4"), "--array=1")
    wait_for(lambda: finished(rerun), f"resubmitted task {rerun}")
    assert sorted(qwen_caption_files(out)) == [f"captions-0000{i}-of-00004.jsonl" for i in range(4)], job_logs(tmp_path)
    assert qwen_captions(out) == reference, job_logs(tmp_path)


def test_scancel_term_of_a_running_job_then_a_rerun(qwen_checkpoint, dataset, reference, tmp_path):
    out = tmp_path / "out"
    job = sbatch(tmp_path, ["srun", *generate(qwen_checkpoint, dataset, out, "--batch-size", "1")], "--ntasks=2")
    wait_for(lambda: lines_in(out) > 0 or finished(job), "the job's first caption")
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    wait_for(lambda: finished(job), f"job {job}")
    assert len(qwen_captions(out)) < COUNT, "the job finished before it was signalled"
    subprocess.run(["srun", "--ntasks", "2", *generate(qwen_checkpoint, dataset, out)], cwd=REPO, env=command_env({}),
                   check=True, capture_output=True, timeout=TIMEOUT)
    assert qwen_captions(out) == reference, job_logs(tmp_path)
