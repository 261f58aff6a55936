"""The training data merge_multi_caption.py writes, read by the trainers' own loaders (webdataset, open_clip's
get_wds_dataset, Hugging Face datasets' json, parquet and webdataset builders), as a user trains on it.
tests/check_other_versions.sh runs this file with webdataset 1.0.2 too, and img2dataset end to end."""
import argparse
import collections
import importlib.metadata
import json
import os

import pytest
from conftest import run_command
from sample_images import image_bytes, write_tar_shard

SOURCES = ["original", "detail", "noun"]
KEYS = [f"{n:09d}" for n in range(6)]


def shard_of(key):
    return f"{int(key) // 3:05d}.tar"


def captions_of(key):
    image = f"{shard_of(key)}/{key}.jpg"
    return [f"a web caption {key}", f"a detailed caption of {image}", f"nouns of {image}"]


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    """img2dataset-style shards captioned twice, merged into webdataset shards (--txt random) and JSONL."""
    folder = tmp_path_factory.mktemp("training")
    os.makedirs(folder / "cc")
    for shard in range(2):
        keys = KEYS[3 * shard:3 * shard + 3]
        write_tar_shard(folder / "cc" / f"{shard:05d}.tar", [
            (key, {"jpg": image_bytes(int(key), size=(40 + int(key), 32)), "txt": captions_of(key)[0],
                   "json": json.dumps({"url": f"http://example.com/{key}.jpg", "key": key, "width": 40 + int(key),
                                       "height": 32, "status": "success"})}) for key in keys])
    for position, source in enumerate(SOURCES[1:], 1):
        os.makedirs(folder / "outputs" / source)
        with open(folder / "outputs" / source / "composed.jsonl", "w") as f:
            f.writelines(json.dumps({"image": f"{shard_of(key)}/{key}.jpg", "caption": captions_of(key)[position],
                                     "truncated": False, "key": key}) + "\n" for key in KEYS)
    indexes = [arg for source in SOURCES[1:] for arg in ("--index", folder / "outputs" / source)]
    merge = ["python", "utils/merge_multi_caption.py", "--original", folder / "cc", *indexes]
    run_command([*merge, "--output-format", "webdataset", "--output", folder / "shards", "--txt", "random",
                 "--txt-seed", "7"])
    run_command([*merge, "--output", folder / "multi.jsonl"])
    return folder


def urls(folder):
    return str(folder / "shards" / "{00000..00001}.tar")


def drawn_texts(folder):
    """{key: the caption --txt random put into KEY.txt}, read back from the shards' own members."""
    import tarfile
    texts = {}
    for shard in ("00000.tar", "00001.tar"):
        with tarfile.open(folder / "shards" / shard) as tar:
            for info in tar:
                key, _, extension = info.name.partition(".")
                if extension == "txt":
                    texts[key] = tar.extractfile(info).read().decode()
    return texts


def test_webdataset_reads_every_caption_and_the_metadata(training_data):
    import webdataset as wds
    samples = list(wds.WebDataset(urls(training_data), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == KEYS
    drawn = drawn_texts(training_data)
    for sample in samples:
        key = sample["__key__"]
        assert sample["jpg"].size == (40 + int(key), 32)
        assert [sample[f"{source}.txt"] for source in SOURCES] == captions_of(key)
        assert sample["txt"] == drawn[key] and drawn[key] in captions_of(key)
        assert sample["json"]["caption"] == captions_of(key) and sample["json"]["sources"] == SOURCES
        assert sample["json"]["url"] == f"http://example.com/{key}.jpg" and sample["json"]["width"] == 40 + int(key)
    assert len(set(drawn.values()) & {c for key in KEYS for c in captions_of(key)[1:]}) >= 2  # not always one source


WEBDATASET = tuple(int(part) for part in importlib.metadata.version("webdataset").split(".")[:3])


@pytest.mark.skipif(WEBDATASET > (0, 2, 86),
                    reason="open_clip 3.3's loader reads webdataset <= 0.2.86 only (its [training] extra's cap)")
def test_open_clip_trains_on_the_drawn_caption_and_counts_the_samples(training_data):
    """open_clip's training loader, sizes.json giving the sample count: each sample's text is its KEY.txt."""
    import open_clip
    from open_clip_train.data import get_wds_dataset
    tokenizer = open_clip.get_tokenizer("RN50")
    args = argparse.Namespace(train_data=urls(training_data), train_num_samples=None, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=2, workers=0, world_size=1)
    preprocess = open_clip.image_transform(32, is_train=True)
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    assert data.dataloader.num_samples == len(KEYS)  # from sizes.json: no --train-num-samples
    got = collections.Counter()
    for images, texts in data.dataloader:
        assert tuple(images.shape[1:]) == (3, 32, 32)
        got.update(tuple(text.tolist()) for text in texts)
    expected = collections.Counter(tuple(tokenizer([text])[0].tolist()) for text in drawn_texts(training_data).values())
    assert got == expected


def test_hugging_face_datasets_loads_the_jsonl_the_parquet_and_the_shards(training_data, tmp_path):
    import datasets
    cache = str(tmp_path / "hf-cache")
    rows = datasets.load_dataset("json", data_files=str(training_data / "multi.jsonl"), split="train", cache_dir=cache)
    assert rows["key"] == KEYS and rows["caption"] == [captions_of(key) for key in KEYS]
    assert rows[0]["truncated"] == [None, False, False] and rows[0]["url"] == "http://example.com/000000000.jpg"
    parquet = datasets.load_dataset("parquet", data_files=str(training_data / "shards" / "*.parquet"), split="train",
                                    cache_dir=cache)
    assert sorted(parquet["key"]) == KEYS and parquet.features["caption"].feature.dtype == "string"
    shards = datasets.load_dataset("webdataset", data_files=str(training_data / "shards" / "*.tar"), split="train",
                                   cache_dir=cache)
    assert sorted(shards["__key__"]) == KEYS
    first = shards[0]
    key = first["__key__"]
    assert first["jpg"].size == (40 + int(key), 32) and first["detail.txt"] == captions_of(key)[1]
    assert first["json"]["caption"] == captions_of(key) and first["json"]["height"] == 32


def test_hugging_face_reads_the_shards_of_a_parquet_dataset_with_mixed_formats(tmp_path):
    """A Hub dataset folder whose images are JPEG and PNG, keyed by its id column: one image member type (the first
    row's format, bytes unchanged), so Hugging Face's webdataset loader takes the shards; keys are the dataset's ids."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    images = [image_bytes(n, fmt="PNG" if n % 2 else "JPEG") for n in range(6)]
    os.makedirs(tmp_path / "ds" / "data")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": None} for b in images], struct),
                             "id": [f"sample-{n}" for n in range(6)], "text": [f"web {n}" for n in range(6)]}),
                   tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    os.makedirs(tmp_path / "detail")
    with open(tmp_path / "detail" / "composed.jsonl", "w") as f:
        f.writelines(json.dumps({"image": f"train-00000-of-00001.parquet/{n}", "caption": f"detail {n}",
                                 "truncated": False}) + "\n" for n in range(6))
    run_command(["python", "utils/merge_multi_caption.py", "--original", tmp_path / "ds", "--index",
                 tmp_path / "detail", "--output-format", "webdataset", "--output", tmp_path / "shards",
                 "--shard-size", "4"])
    shards = datasets.load_dataset("webdataset", data_files=str(tmp_path / "shards" / "*.tar"), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(shards["__key__"]) == [f"sample-{n}" for n in range(6)]
    for sample in shards:
        n = int(sample["__key__"].split("-")[1])
        assert sample["jpg"].size == (48, 40) and sample["detail.txt"] == f"detail {n}" and sample["txt"] == f"web {n}"
