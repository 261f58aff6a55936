"""qwen.py on webdataset tar shards and Parquet files, end to end: the captions of the same images given as
JSON paths (one at a time), a "key" on every line, broken members recorded, resume after kill -9, two processes."""
import json
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_jsonl, run_command
from sample_images import image_bytes, write_input, write_tar_shard
from test_captioning import interrupt

SHARD_SIZES = [4, 3, 5]
BROKEN = {"000000005": "cannot decode", "000000006": "sample 000000006 has no image member (it has: txt)"}


def command(checkpoint, input_spec, out, *extra):
    return ["python", "qwen.py", "--input-json", str(input_spec), "--model", checkpoint, "--output-dir", str(out),
            "--max-new-tokens", "6", "--temperature", "0", "--num-workers", "0", *extra]


def members(number):
    """img2dataset's files of sample `number`; two are broken: a cut-off JPEG, and no image at all."""
    key = f"{number:09d}"
    data = image_bytes(number, size=(40 + 9 * (number % 4), 36 + 5 * (number % 3)), fmt="PNG" if number % 2 else "JPEG")
    if key == "000000005":
        data = data[:len(data) // 2]
    files = {"txt": f"web caption {number}"} if key == "000000006" else {
        "jpg" if data[:2] == b"\xff\xd8" else "png": data, "txt": f"web caption {number}", "json": json.dumps({"key": key})}
    return key, files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The same images as tar shards, as Parquet files and as files listed in JSON: their folders, and keys."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "shards").mkdir()
    (root / "parquet").mkdir()
    (root / "files").mkdir()
    samples = [members(number) for number in range(sum(SHARD_SIZES))]
    start = 0
    for index, size in enumerate(SHARD_SIZES):
        write_tar_shard(root / "shards" / f"{index:05d}.tar", samples[start:start + size])
        start += size
    images = {key: next((data for ext, data in files.items() if ext in ("jpg", "png")), None) for key, files in samples}
    for index, part in enumerate([list(images)[:7], list(images)[7:]]):
        column = pa.StructArray.from_arrays([pa.array([images[key] for key in part], pa.binary()),
                                             pa.array([None] * len(part), pa.string())], names=["bytes", "path"])
        pq.write_table(pa.table({"key": part, "image": column}), root / "parquet" / f"train-{index}.parquet",
                       row_group_size=3)
    good = {key: data for key, data in images.items() if key not in BROKEN}
    for key, data in good.items():
        (root / "files" / key).write_bytes(data)
    write_input(root / "files" / "input.json", list(good))
    return root, [key for key, _ in samples]


@pytest.fixture(scope="module")
def reference(qwen_checkpoint, dataset, tmp_path_factory):
    """{key: caption} of the good images given one at a time as JSON paths."""
    out = tmp_path_factory.mktemp("reference")
    run_command(command(qwen_checkpoint, dataset[0] / "files" / "input.json", out, "--batch-size", "1"))
    captions = {row["image"]: row["caption"] for row in caption_rows(out)}
    assert len(set(captions.values())) > len(captions) // 2  # images tell apart: a mix-up would show
    return captions


def caption_rows(out):
    return [row for path in sorted(out.glob("qwen/*/default/captions-*.jsonl")) for row in read_jsonl(path)]


def error_rows(out):
    return [row for path in sorted(out.glob("qwen/*/errors-*.jsonl")) for row in read_jsonl(path)]


def shard_id(key, dataset_keys):
    """The image id of a sample of the dataset fixture: <shard>/<member name>."""
    number, shard = dataset_keys.index(key), 0
    while number >= SHARD_SIZES[shard]:
        number -= SHARD_SIZES[shard]
        shard += 1
    name = key if key == "000000006" else f"{key}.{'png' if int(key) % 2 else 'jpg'}"
    return f"{shard:05d}.tar/{name}"


@pytest.fixture(scope="module")
def from_shards(qwen_checkpoint, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("from-shards")
    pattern = dataset[0] / "shards" / f"{{00000..{len(SHARD_SIZES) - 1:05d}}}.tar"
    run_command(["bash", "generate.sh", str(pattern), "qwen", *command(qwen_checkpoint, pattern, out)[4:],
                 "--batch-size", "4", "--num-workers", "2"])
    return out


def test_captions_from_shards_equal_one_image_inference_and_broken_members_are_recorded(
        dataset, reference, from_shards):
    root, keys = dataset
    rows = caption_rows(from_shards)
    assert sorted(row["key"] for row in rows) == sorted(reference)
    for row in rows:
        assert row["image"] == shard_id(row["key"], keys)
        assert row["caption"] == reference[row["key"]], row
    errors = {row["image"]: row["error"] for row in error_rows(from_shards)}
    assert sorted(errors) == sorted(shard_id(key, keys) for key in BROKEN)
    for key, reason in BROKEN.items():
        assert errors[shard_id(key, keys)].startswith(reason)


def test_captions_from_parquet_equal_one_image_inference(qwen_checkpoint, dataset, reference, tmp_path):
    root, keys = dataset
    out = tmp_path / "out"
    run_command(["bash", "generate.sh", str(root / "parquet"), "qwen", *command(qwen_checkpoint, "-", out)[4:],
                 "--batch-size", "3", "--num-workers", "2"])
    rows = caption_rows(out)
    assert sorted(row["key"] for row in rows) == sorted(reference)
    for row in rows:
        number = keys.index(row["key"])
        assert row["image"] == (f"train-0.parquet/{number}" if number < 7 else f"train-1.parquet/{number - 7}")
        assert row["caption"] == reference[row["key"]], row
    errors = {row["image"]: row["error"] for row in error_rows(out)}
    assert sorted(errors) == ["train-0.parquet/5", "train-0.parquet/6"]
    assert errors["train-0.parquet/5"].startswith("cannot decode")
    assert errors["train-0.parquet/6"] == "no image in this row (null)"


def test_killed_run_on_shards_resumes_to_the_same_output(qwen_checkpoint, dataset, from_shards, tmp_path):
    out = tmp_path / "out"
    args = command(qwen_checkpoint, dataset[0] / "shards", out, "--batch-size", "1")
    returncode, stderr = interrupt(args, out, signal.SIGKILL)
    assert returncode == -9, stderr
    partial, recorded = caption_rows(out), error_rows(out)
    assert 0 < len(partial) < len(caption_rows(from_shards)), "the run was not interrupted mid-way"
    resumed = run_command(args)
    assert f"{len(partial) + len(recorded)} already done" in resumed.stderr
    assert sorted(map(json.dumps, caption_rows(out))) == sorted(map(json.dumps, caption_rows(from_shards)))


def test_two_processes_caption_every_sample_once_and_a_limit_is_kept(qwen_checkpoint, dataset, from_shards, tmp_path):
    out = tmp_path / "out"
    folder = dataset[0] / "shards"
    run_command(command(qwen_checkpoint, folder, out, "--limit", "3"))
    run_command(["bash", "generate.sh", str(folder), "qwen", *command(qwen_checkpoint, folder, out)[4:]],
                env={"NUM_GPUS": "2"})
    per_rank = {path.name: [row["key"] for row in read_jsonl(path)]
                for path in out.glob("qwen/*/default/captions-*-of-00002.jsonl")}
    first = [row["key"] for row in read_jsonl(next(out.glob("qwen/*/default/captions-00000-of-00001.jsonl")))]
    assert sorted(first) == [f"{n:09d}" for n in range(3)]
    assert all(per_rank.values()), per_rank  # both ranks had work
    every = first + sum(per_rank.values(), [])
    assert sorted(every) == sorted(row["key"] for row in caption_rows(from_shards))  # each exactly once
