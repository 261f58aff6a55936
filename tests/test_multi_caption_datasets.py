"""merge_multi_caption.py with the captioning input as the original (webdataset tar shards, Parquet) and
webdataset shards as output, run as a user runs it. The indexes name images by the ids captioning writes.
tests/test_training_loaders.py reads such output with the trainers' own loaders."""
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
                [{"image": i, "caption": f"detail of {i}", "truncated": i in truncated_ids}
                 for i in reversed(ids[:-1])])
    (folder / "noun_index.json").write_text(json.dumps({i: f"noun of {i}" for i in ids[:-1]}))
    return ["--index", folder / "detail", "--index", folder / "noun_index.json"]


def img2dataset_json(key, **fields):
    """The .json member img2dataset writes beside each image."""
    return json.dumps({"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
                       "width": 48, "height": 40, "original_width": 480, "original_height": 400,
                       "exif": "{}", "sha256": key * 2, **fields})


# the fields of img2dataset's .json that the rows carry (its key and caption say what the row says)
METADATA = {"url", "status", "error_message", "width", "height", "original_width", "original_height", "exif", "sha256"}
# Three img2dataset shards: 00000.tar with captions in .txt; 00001.tar with one caption only in .json and one
# sample without an image (captioning recorded it as unreadable); 00002.tar whose one sample no index has.
SHARDS = {
    "00000.tar": [("000000000", {"jpg": image_bytes(0), "txt": "web zero", "json": img2dataset_json("000000000")}),
                  ("000000001", {"jpg": image_bytes(1), "txt": "web one",
                                 "json": img2dataset_json("000000001", caption="web one")}),
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


def expected_rows(ids, web, truncated_ids=(), extra=lambda image: {}):
    return [{"image": i, "caption": [web(i), f"detail of {i}", f"noun of {i}"],
             "truncated": [None, i in truncated_ids, None], "sources": ["original", "detail", "noun_index"],
             **extra(i)} for i in ids]


def shard_extra(image):
    """The key and the metadata of a shard's sample, as the rows carry them."""
    key = image.split("/")[1].split(".")[0]
    for _, samples in SHARDS.items():
        for sample_key, members in samples:
            if sample_key == key:
                metadata = json.loads(members.get("json", "{}"))
                return {"key": key, **{name: value for name, value in metadata.items() if name in METADATA}}


def shard_web(image):
    return WEB[image.split("/")[1].split(".")[0]]


def test_shards_as_original_to_jsonl(shards):
    folder, ids, indexes = shards
    result = run("--original", f"{folder}/data/{{00000..00002}}.tar", *indexes, "--output", folder / "multi.jsonl",
                 "--qa-report", folder / "qa.json")
    assert read_lines(folder / "multi.jsonl") == expected_rows(ids[:-1], shard_web, {ids[1]}, shard_extra)
    assert "6 original rows, 4 written, 2 dropped" in result.stdout  # 00002's sample and the one without image
    original = json.load(open(folder / "qa.json"))["sources"][0]
    assert original["source"] == str(folder / "data") and original["count"] == 6


def test_shards_to_mirrored_webdataset_with_bytes_unchanged(shards):
    folder, ids, indexes = shards
    out = folder / "multi-wds"
    result = run("--original", folder / "data", *indexes, "--output-format", "webdataset", "--output", out)
    assert "4 samples in 3 shards, 0 left out" in result.stdout
    stems = [name[:-len(".tar")] for name in SHARDS]
    assert sorted(os.listdir(out)) == sorted(  # mirrored, 00002.tar empty: its one sample was dropped
        [f"{stem}{suffix}" for stem in stems for suffix in (".tar", ".parquet", "_stats.json")] + ["sizes.json"])
    rows = {row["image"]: row for row in expected_rows(ids[:-1], shard_web, {ids[1]}, shard_extra)}
    sizes = {}
    for name, samples in SHARDS.items():
        members = read_shard(out / name)
        expected = {}
        for key, input_members in samples:
            image = next((f"{name}/{key}.{e}" for e in input_members if e in ("jpg", "png")), None)
            if image in rows:
                extension = image.rsplit(".", 1)[1]
                row = rows[image]
                expected[f"{key}.{extension}"] = input_members[extension]  # the input's bytes, unchanged
                expected[f"{key}.json"] = {"key": key, **{k: v for k, v in row.items() if k != "key"}}
                for source, caption in zip(row["sources"], row["caption"]):
                    expected[f"{key}.{source}.txt"] = caption
                expected[f"{key}.txt"] = WEB[key]  # --txt original: the web caption, as before
        got = {member: json.loads(data) if member.endswith(".json") else
               data.decode() if member.endswith(".txt") else data for member, data in members.items()}
        assert got == expected, name
        sizes[name] = len(expected) // 6
        stem = name[:-len(".tar")]
        records = [value for member, value in got.items() if member.endswith(".json")]
        columns = {name for record in records for name in record}  # a field a record lacks is null there
        assert pq.read_table(out / f"{stem}.parquet").to_pylist() == [{c: r.get(c) for c in columns} for r in records]
        stats = json.load(open(out / f"{stem}_stats.json"))
        assert (stats["count"], stats["successes"], stats["failed_to_read"]) == (sizes[name], sizes[name], 0)
    assert json.load(open(out / "sizes.json")) == sizes == {"00000.tar": 3, "00001.tar": 1, "00002.tar": 0}
    # a webdataset reader groups them into samples of six members
    samples = [sample for name in SHARDS for sample in iter_tar_samples(str(out / name))]
    assert [(s.key, sorted(s.members)) for s in samples] == [
        (key, sorted([image, "json", "original.txt", "detail.txt", "noun_index.txt", "txt"]))
        for key, image in [("000000000", "jpg"), ("000000001", "jpg"), ("000000002", "png"), ("000000003", "jpg")]]
    result = run_command(["python", "utils/caption_qa.py", out])  # the shards are a caption source too
    assert f"{out} noun_index " in result.stdout
    again = run("--original", folder / "data", *indexes, "--output-format", "webdataset", "--output", out, ok=False)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"merge_multi_caption.py: error: {out} already holds .tar shards: remove them or choose another --output")


def colour_image(n, fmt):
    buffer = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (20 + n, 16), (40 * n, 0, 0)).save(buffer, fmt)
    return buffer.getvalue()


def test_parquet_and_json_originals_to_numbered_shards(tmp_path):
    """A Hub dataset folder (HF image struct, text and id columns) and a JSONL of files: shards of --shard-size
    samples, keyed by the dataset's ids, one image extension throughout."""
    data = tmp_path / "ds" / "data"
    os.makedirs(data)
    images = [colour_image(n, "PNG" if n % 2 else "JPEG") for n in range(5)]
    ids = ["img-a0", "img-a1", "x.2", "img-a3", "img-a4"]  # x.2 has a dot: not a webdataset key
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for part, rows in enumerate([range(0, 3), range(3, 5)]):
        table = pa.table({"image": pa.array([{"bytes": images[n], "path": None} for n in rows], struct),
                          "text": [f"web {n}" for n in rows], "id": [ids[n] for n in rows],
                          "width": [20 + n for n in rows]})
        pq.write_table(table, data / f"train-{part:05d}-of-00002.parquet", row_group_size=2)
    images_ids = [f"train-00000-of-00002.parquet/{row}" for row in range(3)] + [
        f"train-00001-of-00002.parquet/{row}" for row in range(2)]
    indexes = write_indexes(tmp_path / "p-index", images_ids)
    result = run("--original", tmp_path / "ds", *indexes, "--output-format", "webdataset",
                 "--output", tmp_path / "p-out", "--shard-size", "3", "--missing", "keep-shorter", "--txt", "detail")
    assert "5 samples in 2 shards, 0 left out" in result.stdout
    assert json.load(open(tmp_path / "p-out" / "sizes.json")) == {"00000.tar": 3, "00001.tar": 2}
    first, second = read_shard(tmp_path / "p-out" / "00000.tar"), read_shard(tmp_path / "p-out" / "00001.tar")
    assert len(first) == 3 * 6  # image, json, txt and three sources' texts
    members = {**first, **second}
    for n, image in enumerate(images_ids):
        key = ids[n] if n != 2 else f"{n:09d}"
        assert members[f"{key}.jpg"] == images[n]  # the first row's format names every image; bytes unchanged
        captions = [f"web {n}", f"detail of {image}", f"noun of {image}"] if n < 4 else [f"web {n}"]
        sources = ["original", "detail", "noun_index"][:len(captions)]
        assert json.loads(members[f"{key}.json"]) == {
            "key": key, "image": image, "caption": captions, "truncated": [None, False, None][:len(captions)],
            "sources": sources, "id": ids[n], "width": 20 + n}
        assert [members[f"{key}.{source}.txt"].decode() for source in sources] == captions
        # --txt detail; the last row has no detail caption (keep-shorter), so no .txt: loaders skip it
        assert members.get(f"{key}.txt", b"").decode() == (f"detail of {image}" if n < 4 else "")

    os.makedirs(tmp_path / "files" / "img")
    for n in range(2):
        (tmp_path / "files" / "img" / f"{n}.jpeg").write_bytes(images[2 * n])
    write_lines(tmp_path / "files" / "original.jsonl", [{"image": f"img/{n}.jpeg", "caption": f"web {n}"}
                                                        for n in range(2)])
    indexes = write_indexes(tmp_path / "f-index", ["img/0.jpeg", "img/1.jpeg", "img/absent.jpeg"])
    run("--original", tmp_path / "files" / "original.jsonl", *indexes, "--output-format", "webdataset",
        "--output", tmp_path / "f-out")
    members = read_shard(tmp_path / "f-out" / "00000.tar")
    assert [name for name in members if not name.endswith(".txt")] == [
        "000000000.jpeg", "000000000.json", "000000001.jpeg", "000000001.json"]
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
    assert sorted(got) == sorted(f"{key}.{ext}" for key in keys
                                 for ext in ("jpg", "json", "txt", "original.txt", "default.txt"))
    for shard, key in [(0 if int(key) < 3 else 1, key) for key in keys]:
        image = f"{shard:05d}.tar/{key}.jpg"
        assert got[f"{key}.jpg"] == samples[key]["jpg"]
        assert json.loads(got[f"{key}.json"])["caption"] == [samples[key]["txt"], captions[image]]
        assert got[f"{key}.txt"].decode() == samples[key]["txt"]
        assert got[f"{key}.default.txt"].decode() == captions[image]
    result = run_command(["python", "utils/gallery.py", folder, "--input-json", spec, "--output-dir",
                          tmp_path / "gallery"])
    assert "5 images (5 shown, 0 unreadable)" in result.stdout
    result = run_command(["python", "utils/gallery.py", tmp_path / "train", "--output-dir", tmp_path / "g2"])
    assert "5 images (5 shown, 0 unreadable), 2 caption sources" in result.stdout  # images from the shards
    assert "<th>original</th><th>default</th>" in (tmp_path / "g2" / "index.html").read_text()  # the rows' sources
