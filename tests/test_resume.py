"""Resume that cannot be fooled, and mistakes that explain themselves before the model loads (issue 12), through
the real scripts: qwen.py and generate.sh on the tiny Qwen2-VL checkpoint, utils/merge.py, utils/launch.py."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_jsonl, run_command
from sample_images import write_input, write_pattern_images

COUNT = 12
CHECKPOINT = "tiny-qwen2-vl"  # the folder name of the session's checkpoint, so the output folder's name


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pattern_images(tmp_path_factory.mktemp("resume-dataset"), COUNT, seed=200)[0]


def command(checkpoint, input_file, out, *extra):
    return ["python", "qwen.py", "--input-json", str(input_file), "--model", checkpoint, "--output-dir", str(out),
            "--max-new-tokens", "6", "--temperature", "0", "--num-workers", "0", *extra]


def caption_files(out):
    return sorted(out.glob(f"qwen/{CHECKPOINT}/default/captions-*.jsonl"))


def all_rows(out):
    """Every caption line of every rank file, as (image, caption)."""
    return sorted((row["image"], row["caption"]) for path in caption_files(out) for row in read_jsonl(path))


def error_lines(result):
    """stderr without python -X importtime's report."""
    return [line for line in result.stderr.strip().splitlines() if not line.startswith("import time:")]


@pytest.fixture(scope="module")
def reference(qwen_checkpoint, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_command(command(qwen_checkpoint, dataset, out, "--batch-size", "4"))
    rows = all_rows(out)
    assert len(rows) == COUNT
    return rows


def first(rows, count):
    names = [f"photo-{i:02d}.png" for i in range(count)]
    return [row for row in rows if row[0] in names]


# ------------------------------------------------------------------------------------------------------------
# Mistakes answered at once, without torch or transformers, in one line


@pytest.fixture
def mistakes(tmp_path, dataset):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    return {
        "help": (["qwen.py", "--help"], 0, "usage: qwen.py"),
        "input": (["qwen.py", "--input-json", str(tmp_path / "nowhere.json"), "--model", str(tmp_path),
                   "--output-dir", str(tmp_path / "out")], 2, "nowhere.json: no such file"),
        "local model": (["qwen.py", "--input-json", str(dataset), "--model", str(tmp_path / "run2" / "final")],
                        2, f"--model {tmp_path / 'run2' / 'final'}: no such file or folder"),
        "output under a file": (["qwen.py", "--input-json", str(dataset), "--model", str(tmp_path),
                                 "--output-dir", str(a_file / "out")], 2, f"--output-dir {a_file / 'out'}: cannot write"),
        "unreachable hub": (["qwen.py", "--input-json", str(dataset), "--model", "Qwen/Qwen2-VL-7B-Instruct",
                             "--output-dir", str(tmp_path / "out")], 2, "the Hugging Face hub cannot be reached"),
    }


def offline_hub(home):
    """The hub at a closed local port, the cache in `home`: "cannot be reached" at once, in CI too."""
    return {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize("case", ["help", "input", "local model", "output under a file", "unreachable hub"])
def test_help_and_mistakes_answer_without_torch(mistakes, case, tmp_path):
    args, status, expected = mistakes[case]
    env = offline_hub(tmp_path / "hf-home")
    started = time.time()
    result = run_command(["python", "-X", "importtime", *args], check=False, env=env, timeout=120)
    seconds = time.time() - started
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "transformers"}, "torch or transformers imported for a check"
    assert result.returncode == status, result.stderr
    lines = error_lines(result)
    if status:
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, lines
        if case == "unreachable hub":
            assert "--model DIR" in lines[0]
        assert not (tmp_path / "out").exists(), "output folders made for a run that cannot start"
    else:
        assert expected in result.stdout
    assert seconds < 30, f"{seconds:.1f} s"  # generous for a loaded CI machine; a hub retry loop takes minutes


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_one_line(qwen_checkpoint, dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    result = run_command(command(qwen_checkpoint, dataset, locked / "out"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"qwen.py: error: --output-dir {locked / 'out'}: cannot write in "
                                   f"{locked / 'out' / 'qwen' / CHECKPOINT}: Permission denied"]


def test_cached_hub_id_runs_offline_at_once(qwen_checkpoint, dataset, reference, tmp_path):
    """A hub id in the local cache with the hub out of reach: the cached snapshot, without minutes of retries."""
    repo = tmp_path / "hf-home" / "hub" / "models--tiny--qwen2-vl"
    shutil.copytree(qwen_checkpoint, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    out = tmp_path / "out"
    env = offline_hub(tmp_path / "hf-home")
    result = run_command(command("tiny/qwen2-vl", dataset, out, "--limit", "3"), env=env, timeout=120)
    assert "using the cached tiny/qwen2-vl" in result.stderr
    rows = sorted((row["image"], row["caption"]) for row in read_jsonl(out / "qwen" / "qwen2-vl" / "default" /
                                                                      "captions-00000-of-00001.jsonl"))
    assert rows == first(reference, 3)
    record = json.loads((out / "qwen" / "qwen2-vl" / "default" / "run.json").read_text())
    assert record["checkpoint"] == {"model": "tiny/qwen2-vl", "identity": "hub:tiny/qwen2-vl@0123abc"}


# ------------------------------------------------------------------------------------------------------------
# The run record


def test_other_checkpoint_or_settings_stop_before_the_model_loads(qwen_checkpoint, dataset, reference, tmp_path):
    out = tmp_path / "out"
    run_command(command(qwen_checkpoint, dataset, out, "--limit", "5"))
    captions = caption_files(out)[0]
    before = captions.read_bytes()
    # Another checkpoint with the same folder name, whose weights would not even load.
    other = tmp_path / "run2" / CHECKPOINT
    shutil.copytree(qwen_checkpoint, other)
    (other / "model.safetensors").write_bytes(b"not the weights of the first run")
    changed = ["--model", str(other), "--max-new-tokens", "4", "--max-pixels", str(28 * 28 * 8), "--dtype", "bfloat16"]
    result = run_command(command(qwen_checkpoint, dataset, out, "--limit", "5") + changed, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines  # one line: no model load reported either
    for difference in (f"--model {qwen_checkpoint} then, {other} now", "--max-new-tokens 6 then, 4 now",
                       f"--max-pixels None then, {28 * 28 * 8} now", "--dtype float32 then, bfloat16 now",
                       "another --output-dir", "--overwrite"):
        assert difference in lines[0], lines[0]
    assert captions.read_bytes() == before
    # What changes only the speed resumes.
    resumed = run_command(command(qwen_checkpoint, dataset, out, "--limit", "5", "--batch-size", "2",
                                  "--sort-window", "1", "--attn-implementation", "eager", "--num-workers", "1"))
    assert "5 already done" in resumed.stderr
    # --overwrite replaces outputs and record; the new record then decides.
    run_command(command(qwen_checkpoint, dataset, out, "--limit", "5", "--max-new-tokens", "4", "--overwrite"))
    assert json.loads((captions.parent / "run.json").read_text())["settings"]["max_new_tokens"] == 4
    assert all(row["image"] in dict(first(reference, 5)) for row in read_jsonl(captions)) and captions.read_bytes() != before
    again = run_command(command(qwen_checkpoint, dataset, out, "--limit", "5"), check=False)
    assert again.returncode == 2 and "--max-new-tokens 4 then, 6 now" in again.stderr


def test_fine_tunes_of_one_base_are_told_apart_by_their_weights(qwen_checkpoint, dataset, tmp_path):
    """/run1/final and /run2/final: the same file names, sizes, config and tokenizer, one tensor different. The
    second is another checkpoint (it stops before the model loads); a copy of the first is the same one (resumes)."""
    from safetensors.torch import load_file, save_file
    first_run, second_run, copy = (tmp_path / name / "final" for name in ("run1", "run2", "copy"))
    for folder in (first_run, second_run, copy):
        shutil.copytree(qwen_checkpoint, folder)
    weights = load_file(second_run / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1  # the same shape and dtype: the same file size
    save_file(weights, second_run / "model.safetensors", metadata={"format": "pt"})
    assert (second_run / "model.safetensors").stat().st_size == (first_run / "model.safetensors").stat().st_size
    out = tmp_path / "out"
    run_command(command(str(first_run), dataset, out, "--limit", "3"))
    other = run_command(command(str(second_run), dataset, out, "--limit", "3"), check=False)
    assert other.returncode == 2 and "--model" in other.stderr and "then," in other.stderr, other.stderr
    same = run_command(command(str(copy), dataset, out, "--limit", "3"))
    assert "3 already done" in same.stderr


def test_outputs_without_a_record_are_not_passed_off(qwen_checkpoint, dataset, tmp_path):
    """Captions written before run records existed cannot be checked: the run stops instead of skipping them."""
    folder = tmp_path / "out" / "qwen" / CHECKPOINT / "default"
    folder.mkdir(parents=True)
    (folder / "captions-00000-of-00001.jsonl").write_text(json.dumps({"image": "photo-00.png", "caption": "old"}) + "\n")
    result = run_command(command(qwen_checkpoint, dataset, tmp_path / "out"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"qwen.py: error: {folder} holds captions without a run record (run.json, written "
                                   "since this version), so they cannot be checked against these settings: give "
                                   "another --output-dir, or --overwrite to replace them"]


# ------------------------------------------------------------------------------------------------------------
# Byte-safe reading of earlier output

TAILS = {
    "cut inside a UTF-8 character": lambda data: data + '{"image": "photo-11.png", "caption": "caf'.encode() + b"\xc3",
    "a complete line that lost its newline": lambda data: data[:-1],
}


@pytest.mark.parametrize("tail", list(TAILS))
def test_partial_tail_is_cut_before_decoding(qwen_checkpoint, dataset, reference, tmp_path, tail):
    out = tmp_path / "out"
    run_command(command(qwen_checkpoint, dataset, out, "--batch-size", "5", "--limit", "5"))
    captions = caption_files(out)[0]
    captions.write_bytes(TAILS[tail](captions.read_bytes()))
    merged = run_command(["python", "utils/merge.py", str(captions.parent)])
    assert "1 partial endings skipped" in merged.stdout
    assert len(read_jsonl(captions.parent / "composed.jsonl")) == (5 if "UTF-8" in tail else 4)
    resumed = run_command(command(qwen_checkpoint, dataset, out, "--batch-size", "4"))
    assert f"{5 if 'UTF-8' in tail else 4} already done" in resumed.stderr
    assert captions.read_bytes().endswith(b"\n") and all(line.endswith(b"\n") for line in captions.read_bytes().splitlines(True))
    assert all_rows(out) == reference


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_ends_with_one_line_and_keeps_what_was_written(qwen_checkpoint, image_folder, tmp_path):
    folder, good, broken = image_folder
    input_file = write_input(tmp_path / "input.json", broken[:2] + good[:3])
    out = tmp_path / "out"
    args = command(qwen_checkpoint, input_file, out, "--image-root", str(folder), "--batch-size", "5")
    captions = out / "qwen" / CHECKPOINT / "default" / "captions-00000-of-00001.jsonl"
    captions.parent.mkdir(parents=True)
    captions.symlink_to("/dev/full")  # every write there fails as on a full disk
    result = run_command(args, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result)[-1].startswith(f"qwen.py: error: cannot write {captions}: No space left on device")
    errors = captions.parent.parent / "errors-00000-of-00001.jsonl"
    assert sorted(row["image"] for row in read_jsonl(errors)) == sorted(broken[:2])  # written before: kept
    captions.unlink()
    resumed = run_command(args)
    assert "2 already done or recorded as failed" in resumed.stderr
    assert sorted(row["image"] for row in read_jsonl(captions)) == sorted(good[:3])


# ------------------------------------------------------------------------------------------------------------
# The launcher


def test_sigterm_to_a_two_process_run_resumes_exactly(qwen_checkpoint, dataset, reference, tmp_path):
    out = tmp_path / "out"
    launch = ["bash", "generate.sh", str(dataset), "qwen", *command(qwen_checkpoint, dataset, out, "--batch-size", "1")[4:]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "NUM_GPUS": "2", "PYTHON": sys.executable,
           "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(launch, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if any(path.stat().st_size for path in caption_files(out)):
            process.send_signal(signal.SIGTERM)  # generate.sh has exec'd the launcher: this is its process
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.count("stopped by SIGTERM") == 2, stderr  # each rank finished its batch and said so
    assert all(path.read_bytes().endswith(b"\n") for path in caption_files(out) if path.stat().st_size)
    partial = all_rows(out)
    assert 0 < len(partial) < COUNT, "the run was not interrupted mid-way"
    run_command(launch, env={"NUM_GPUS": "2"})
    assert all_rows(out) == reference


def test_two_nodes_started_at_once_caption_every_image_once(qwen_checkpoint, dataset, reference, tmp_path):
    """NNODES=2 on one host, as two launches of generate.sh: disjoint rank files that make up the whole input."""
    out = tmp_path / "out"
    launch = ["bash", "generate.sh", str(dataset), "qwen", *command(qwen_checkpoint, dataset, out, "--batch-size", "2")[4:]]
    nodes = [subprocess.Popen(launch, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "NUM_GPUS": "1", "NNODES": "2",
                                   "NODE_RANK": str(rank), "PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false"})
             for rank in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=180)
        assert node.returncode == 0, stderr
    assert [path.name for path in caption_files(out)] == ["captions-00000-of-00002.jsonl", "captions-00001-of-00002.jsonl"]
    per_rank = [{row["image"] for row in read_jsonl(path)} for path in caption_files(out)]
    assert not per_rank[0] & per_rank[1]
    assert all_rows(out) == reference


def test_launcher_sets_ranks_and_reports_a_failed_one(tmp_path):
    script = ("import os, sys; e = os.environ; os.write(1, f\"{e['RANK']} {e['WORLD_SIZE']} {e['LOCAL_RANK']}\\n\".encode()); "
              "sys.exit(3 if e['LOCAL_RANK'] == '1' else 0)")
    result = run_command(["python", "utils/launch.py", "--nproc", "3", "--nnodes", "2", "--node-rank", "1", "--",
                          sys.executable, "-c", script], check=False)
    assert sorted(result.stdout.split("\n")[:-1]) == ["3 6 0", "4 6 1", "5 6 2"]  # the others ran to the end
    assert result.returncode == 3
    assert result.stderr.strip() == "launch.py: rank 4 exited with status 3"


def test_large_weight_files_are_hashed_once_and_by_their_bytes(tmp_path, monkeypatch):
    """A weight file over utils/checkpoints.py's LARGEST_HASHED is hashed with BLAKE3 and its digest kept: the second
    identity reads nothing of it; one byte changed in place (same size) gives another identity, and a file modified
    just before it is hashed keeps no digest (its modification time may not show the next change)."""
    from utils import checkpoints, file_hashes
    monkeypatch.setenv("SYNTHETIC_CAPTION_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(os.urandom(1024) * (checkpoints.LARGEST_HASHED // 1024 + 1))
    an_hour_ago = time.time() - 3600
    os.utime(weights, (an_hour_ago, an_hour_ago))  # written earlier: its digest is kept
    first = checkpoints.hash_contents(str(folder))
    assert len((tmp_path / "cache" / "file-digests.jsonl").read_text().splitlines()) == 1
    hashed = []
    monkeypatch.setattr(file_hashes.blake3, "blake3", lambda **kwargs: hashed.append(kwargs))
    assert checkpoints.hash_contents(str(folder)) == first and not hashed  # from the kept digest
    monkeypatch.undo()
    monkeypatch.setenv("SYNTHETIC_CAPTION_CACHE", str(tmp_path / "cache"))
    with open(weights, "r+b") as f:
        f.seek(12345)
        f.write(bytes([f.read(1)[0] ^ 1]))
    assert checkpoints.hash_contents(str(folder)) != first
    # modified just now, within the file system's clock granularity of the hashing: not kept, so hashed again
    assert len((tmp_path / "cache" / "file-digests.jsonl").read_text().splitlines()) == 1
