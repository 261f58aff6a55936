"""README's end-to-end recipe with the real tools: img2dataset downloads over a local http server, generate.sh
captions the shards, the merges write training shards, and open_clip trains a step on the generated captions.
img2dataset and open_clip's trainer are not installed for CI (img2dataset needs pandas < 3, which
datasets 5.2 does not take); tests/check_other_versions.sh installs them beside the suite and runs this."""
import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_command
from sample_images import image_bytes

pytest.importorskip("img2dataset")

IMG2DATASET_FIELDS = {"url", "key", "status", "error_message", "width", "height", "original_width",
                      "original_height", "exif", "sha256"}


@pytest.fixture
def image_server(tmp_path):
    """Five JPEGs over http on localhost; -> their URLs."""
    folder = tmp_path / "web"
    folder.mkdir()
    for n in range(5):
        (folder / f"{n}.jpg").write_bytes(image_bytes(n, size=(60 + 4 * n, 48)))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{server.server_port}/{n}.jpg" for n in range(5)]
    server.shutdown()


def test_img2dataset_to_captions_to_open_clip(qwen_checkpoint, image_server, tmp_path):
    with open(tmp_path / "urls.tsv", "w") as f:
        f.write("url\tcaption\n" + "".join(f"{url}\tweb caption {n}\n" for n, url in enumerate(image_server)))
    run_command(["img2dataset", "--url_list", tmp_path / "urls.tsv", "--input_format", "tsv", "--url_col", "url",
                 "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", tmp_path / "cc",
                 "--processes_count", "1", "--thread_count", "2", "--image_size", "64", "--number_sample_per_shard",
                 "3", "--enable_wandb", "False"], timeout=300)
    run_command(["bash", "generate.sh", tmp_path / "cc", "qwen", "--model", qwen_checkpoint, "--output-dir",
                 tmp_path / "outputs", "--max-new-tokens", "6", "--temperature", "0", "--num-workers", "0"])
    run_command(["python", "utils/merge.py", "--output-dir", tmp_path / "outputs"])
    (captions,) = (tmp_path / "outputs" / "qwen").glob("*/default")
    run_command(["python", "utils/merge_multi_caption.py", "--original", tmp_path / "cc", "--index", captions,
                 "--output-format", "webdataset", "--output", tmp_path / "train", "--txt", "default"])

    sizes = json.load(open(tmp_path / "train" / "sizes.json"))
    assert sizes == {"00000.tar": 3, "00001.tar": 2}
    import webdataset as wds
    samples = list(wds.WebDataset(str(tmp_path / "train" / "{00000..00001}.tar"), shardshuffle=False))
    generated = {json.loads(line)["image"]: json.loads(line)["caption"] for line in open(captions / "composed.jsonl")}
    for sample in samples:
        record = json.loads(sample["json"])
        assert IMG2DATASET_FIELDS - {"key"} <= set(record) and record["status"] == "success"  # its metadata kept
        assert sample["txt"].decode() == generated[record["image"]] == sample["default.txt"].decode()
        assert record["caption"] == [record["caption"][0], generated[record["image"]]]
    assert len(samples) == 5

    run_command(["python", "-m", "open_clip_train.main", "--train-data", tmp_path / "train" / "{00000..00001}.tar",
                 "--dataset-type", "webdataset", "--model", "RN50", "--batch-size", "2", "--epochs", "1",
                 "--workers", "1", "--precision", "fp32", "--logs", tmp_path / "logs", "--name", "step",
                 "--save-frequency", "0", "--report-to", ""], timeout=600)
    log = (tmp_path / "logs" / "step" / "out.log").read_text()
    assert "Train Epoch: 0 [" in log and "Loss:" in log
