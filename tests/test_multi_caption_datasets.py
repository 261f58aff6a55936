"""merge_multi_caption.py with the captioning input as the original (webdataset tar shards, Parquet) and
webdataset shards as output, run as a user runs it. The indexes name images by the ids captioning writes."""
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_command
from sample_images import image_bytes, write_tar_shard

from utils.tar_shards import iter_tar_samples


def run(*args, ok=True):
    return run_command(["python", "utils/merge_multi_caption.py", *map(str, args)], check=ok, timeout=120)


def write_lines(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_shard(path):
    """{member name: bytes} of a tar shard, in file order."""
    with tarfile.open(path) as tar:
        return {info.name: tar.extractfile(info).read() for info in tar}


def write_indexes(folder, ids, truncated_ids=()):
    """Two caption sources as utils/merge.py writes them: detail (composed.jsonl with truncated flags) and noun
    (composed_index.json); both miss the last id."""
    write_lines(folder / "detail" / "composed.jsonl",
                [{"image": i, "caption": f"detail of {i}", **({"truncated": True} if i in truncated_ids else {})}
                 for i in reversed(ids[:-1])])
    (folder / "noun_index.json").write_text(json.dumps({i: f"noun of {i}" for i in ids[:-1]}))
    return ["--index", folder / "detail", "--index", folder / "noun_index.json"]


# Three img2dataset shards: 00000.tar with captions in .txt; 00001.tar with one caption only in .json and one
# sample without an image (captioning recorded it as unreadable); 00002.tar whose one sample no index has.
SHARDS = {
    "00000.tar": [("000000000", {"jpg": image_bytes(0), "txt": "web zero", "json": '{"key": "000000000"}'}),
                  ("000000001", {"jpg": image_bytes(1), "txt": "web one", "json": '{"key": "000000001"}'}),
                  ("000000002", {"png": image_bytes(2, fmt="PNG"), "txt": "web two"})],
    "00001.tar": [("000000003", {"jpg": image_bytes(3), "json": '{"key": "000000003", "caption": "web three"}'}),
                  ("000000004", {"txt": "web four, no image"})],
    "00002.tar": [("000000005", {"jpg": image_bytes(5), "txt": "web five"})],
}
WEB = {"000000000": "web zero", "000000001": "web one", "000000002": "web two", "000000003": "web three"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds")
    for name, samples in SHARDS.items():
        os.makedirs(folder / "data", exist_ok=True)
        write_tar_shard(folder / "data" / name, samples)
    # the ids captioning wrote for the samples with an image: <shard>/<member>, relative to data/
    ids = [f"{shard}/{key}.{next(e for e in members if e in ('jpg', 'png'))}"
           for shard, samples in SHARDS.items() for key, members in samples if "jpg" in members or "png" in members]
    return folder, ids, write_indexes(folder, ids, truncated_ids={ids[1]})


def expected_rows(ids, web, truncated_ids=()):
    return [{"image": i, "caption": [web(i), f"detail of {i}", f"noun of {i}"],
             "truncated": [None, True if i in truncated_ids else None, None]} for i in ids]


def shard_web(image):
    return WEB[image.split("/")[1].split(".")[0]]


def test_shards_as_original_to_jsonl(shards):
    folder, ids, indexes = shards
    result = run("--original", f"{folder}/data/{{00000..00002}}.tar", *indexes, "--output", folder / "multi.jsonl",
                 "--qa-report", folder / "qa.json")
    assert read_lines(folder / "multi.jsonl") == expected_rows(ids[:-1], shard_web, {ids[1]})
    assert "6 original rows, 4 written, 2 dropped" in result.stdout  # 00002's sample and the one without image
    original = json.load(open(folder / "qa.json"))["sources"][0]
    assert original["source"] == str(folder / "data") and original["count"] == 6


def test_shards_to_mirrored_webdataset_with_bytes_unchanged(shards):
    folder, ids, indexes = shards
    out = folder / "multi-wds"
    result = run("--original", folder / "data", *indexes, "--output-format", "webdataset", "--output", out)
    assert "4 samples in 3 shards, 0 left out" in result.stdout
    assert sorted(os.listdir(out)) == sorted(SHARDS)  # mirrored, 00002.tar empty: its one sample was dropped
    rows = {row["image"]: row for row in expected_rows(ids[:-1], shard_web, {ids[1]})}
    for name, samples in SHARDS.items():
        members = read_shard(out / name)
        expected = {}
        for key, input_members in samples:
            image = next((f"{name}/{key}.{e}" for e in input_members if e in ("jpg", "png")), None)
            if image in rows:
                extension = image.rsplit(".", 1)[1]
                expected[f"{key}.{extension}"] = input_members[extension]  # the input's bytes, unchanged
                expected[f"{key}.json"] = {"key": key, **rows[image]}
                expected[f"{key}.txt"] = WEB[key]
        got = {member: json.loads(data) if member.endswith(".json") else
               data.decode() if member.endswith(".txt") else data for member, data in members.items()}
        assert got == expected, name
    # a webdataset reader groups them into samples of three members
    samples = [sample for name in SHARDS for sample in iter_tar_samples(str(out / name))]
    assert [(s.key, sorted(s.members)) for s in samples] == [
        ("000000000", ["jpg", "json", "txt"]), ("000000001", ["jpg", "json", "txt"]),
        ("000000002", ["json", "png", "txt"]), ("000000003", ["jpg", "json", "txt"])]
    again = run("--original", folder / "data", *indexes, "--output-format", "webdataset", "--output", out, ok=False)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"merge_multi_caption.py: error: {out} already holds .tar shards: remove them or choose another --output")


def colour_image(n, fmt):
    buffer = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (20 + n, 16), (40 * n, 0, 0)).save(buffer, fmt)
    return buffer.getvalue()


def test_parquet_and_json_originals_to_numbered_shards(tmp_path):
    """Parquet rows (HF image struct, text column) and a JSONL of files: shards of --shard-size samples."""
    os.makedirs(tmp_path / "parquet")
    images = [colour_image(n, "PNG" if n % 2 else "JPEG") for n in range(5)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for part, rows in enumerate([range(0, 3), range(3, 5)]):
        table = pa.table({"image": pa.array([{"bytes": images[n], "path": None} for n in rows], struct),
                          "text": [f"web {n}" for n in rows]})
        pq.write_table(table, tmp_path / "parquet" / f"part-{part}.parquet", row_group_size=2)
    ids = [f"part-0.parquet/{row}" for row in range(3)] + [f"part-1.parquet/{row}" for row in range(2)]
    indexes = write_indexes(tmp_path / "p-index", ids)
    result = run("--original", tmp_path / "parquet", *indexes, "--output-format", "webdataset",
                 "--output", tmp_path / "p-out", "--shard-size", "3", "--missing", "keep-shorter")
    assert "5 samples in 2 shards, 0 left out" in result.stdout
    assert sorted(os.listdir(tmp_path / "p-out")) == ["00000.tar", "00001.tar"]
    members = {**read_shard(tmp_path / "p-out" / "00000.tar"), **read_shard(tmp_path / "p-out" / "00001.tar")}
    assert len(read_shard(tmp_path / "p-out" / "00000.tar")) == 9  # 3 samples of 3 members
    for n, image in enumerate(ids):
        key = f"{n:09d}"
        assert members[f"{key}.{'png' if n % 2 else 'jpg'}"] == images[n]
        captions = [f"web {n}", f"detail of {image}", f"noun of {image}"] if n < 4 else [f"web {n}"]
        assert json.loads(members[f"{key}.json"]) == {"key": key, "image": image, "caption": captions,
                                                      "truncated": [None] * len(captions)}
        assert members[f"{key}.txt"].decode() == f"web {n}"

    os.makedirs(tmp_path / "files" / "img")
    for n in range(2):
        (tmp_path / "files" / "img" / f"{n}.jpeg").write_bytes(images[2 * n])
    write_lines(tmp_path / "files" / "original.jsonl", [{"image": f"img/{n}.jpeg", "caption": f"web {n}"}
                                                        for n in range(2)])
    indexes = write_indexes(tmp_path / "f-index", ["img/0.jpeg", "img/1.jpeg", "img/absent.jpeg"])
    run("--original", tmp_path / "files" / "original.jsonl", *indexes, "--output-format", "webdataset",
        "--output", tmp_path / "f-out")
    members = read_shard(tmp_path / "f-out" / "00000.tar")
    assert list(members) == ["000000000.jpeg", "000000000.json", "000000000.txt",
                             "000000001.jpeg", "000000001.json", "000000001.txt"]
    assert members["000000001.jpeg"] == images[2]


def test_captioned_shards_end_to_end(qwen_checkpoint, tmp_path):
    """generate.sh on img2dataset shards -> merge.py -> webdataset shards for training, and the gallery: each
    sample carries its web caption and the caption qwen.py wrote for it, with the input's image bytes."""
    from conftest import run_command
    samples = {f"{n:09d}": {"jpg": image_bytes(n, size=(40 + 8 * n, 36)), "txt": f"web {n}"} for n in range(6)}
    samples["000000004"]["jpg"] = samples["000000004"]["jpg"][:200]  # cut off: recorded, not captioned
    os.makedirs(tmp_path / "cc")
    for shard, keys in enumerate([list(samples)[:3], list(samples)[3:]]):
        write_tar_shard(tmp_path / "cc" / f"{shard:05d}.tar", [(key, samples[key]) for key in keys])
    spec = f"{tmp_path}/cc/{{00000..00001}}.tar"
    run_command(["bash", "generate.sh", spec, "qwen", "--model", qwen_checkpoint, "--output-dir", tmp_path / "out",
                 "--max-new-tokens", "6", "--temperature", "0", "--num-workers", "0"])
    run_command(["python", "utils/merge.py", "--output-dir", tmp_path / "out"])
    (folder,) = (tmp_path / "out" / "qwen").glob("*/default")
    captions = {row["image"]: row["caption"] for row in read_lines(folder / "composed.jsonl")}
    assert len(captions) == 5 and "00001.tar/000000004.jpg" not in captions
    run("--original", spec, "--index", folder, "--output-format", "webdataset", "--output", tmp_path / "train")
    got = {**read_shard(tmp_path / "train" / "00000.tar"), **read_shard(tmp_path / "train" / "00001.tar")}
    keys = [key for key in samples if key != "000000004"]
    assert sorted(got) == sorted(f"{key}.{ext}" for key in keys for ext in ("jpg", "json", "txt"))
    for shard, key in [(0 if int(key) < 3 else 1, key) for key in keys]:
        image = f"{shard:05d}.tar/{key}.jpg"
        assert got[f"{key}.jpg"] == samples[key]["jpg"]
        assert json.loads(got[f"{key}.json"])["caption"] == [samples[key]["txt"], captions[image]]
        assert got[f"{key}.txt"].decode() == samples[key]["txt"]
    result = run_command(["python", "utils/gallery.py", folder, "--input-json", spec, "--output-dir",
                          tmp_path / "gallery"])
    assert "5 images (5 shown, 0 unreadable)" in result.stdout
