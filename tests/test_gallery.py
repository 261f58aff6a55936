"""utils/gallery.py: the page it writes, opened in headless Chromium (Debian package `chromium`)."""
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "magenta": (255, 0, 255)}
ATTACK = "<script>document.title='pwned';document.body.append(Object.assign(document.createElement('div'),{id:'pwned'}))</script>"


def run_gallery(*args, ok=True):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "utils", "gallery.py"), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A multi-caption file of four plain-colour images with odd names, one missing image, and
    captions that try to inject markup; the gallery samples all five."""
    folder = tmp_path_factory.mktemp("gallery")
    rows = []
    for n, (name, color) in enumerate(COLORS.items()):
        path = f'img/{name} "<b>{n}" &amp; x.png'
        os.makedirs(folder / "img", exist_ok=True)
        Image.new("RGB", (320 + 40 * n, 200), color).save(folder / path)
        rows.append({"image": path, "caption": [f"web {name}", f"A {name} rectangle. {ATTACK}",
                                                 "I'm sorry, I cannot describe this image.", f"{name} & <i>co</i>"]})
    rows.append({"image": "img/missing.png", "caption": ["web missing", "", "A cup.", "cup"]})
    with open(folder / "multi.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    result = run_gallery(folder / "multi.jsonl", "--output-dir", folder / "out", "--image-root", folder,
                         "--names", "original,detail,<em>noun</em>,style", "--sample", "10", "--seed", "3")
    assert "5 images (4 shown, 1 unreadable), 4 caption sources" in result.stdout
    return folder, rows


class Page(HTMLParser):
    """The parts of a dumped DOM the tests look at."""

    def __init__(self):
        super().__init__()
        self.title, self.scripts, self.thumbs, self.cells, self.ids = "", 0, [], [], set()
        self.stack = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        self.scripts += tag == "script"
        if tag == "img" and "thumb" in (attrs.get("class") or ""):
            self.thumbs.append(attrs)
        if tag == "td" and "caption" in (attrs.get("class") or ""):
            self.cells.append({"class": attrs["class"], "flags": attrs.get("data-flags", ""), "text": ""})
        if tag not in ("img", "br", "meta", "link"):
            self.stack.append((tag, tag == "td" and "caption" in (attrs.get("class") or "")))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        tags = [tag for tag, _ in self.stack]
        if "title" in tags:
            self.title += data
        cells = [is_caption for tag, is_caption in self.stack if tag == "td"]
        if cells and cells[-1]:
            self.cells[-1]["text"] += data


def chromium(*args, tmp_path):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_page_files_and_escaping(gallery):
    folder, rows = gallery
    text = (folder / "out" / "index.html").read_text()
    assert "<script" not in text and "<b>" not in text and "<i>co" not in text and "<em>" not in text
    assert "&lt;script&gt;" in text and "&lt;em&gt;noun&lt;/em&gt;" in text
    assert len(os.listdir(folder / "out" / "thumbs")) == 4
    with Image.open(folder / "out" / "lengths.png") as histogram:
        assert histogram.format == "PNG" and histogram.width > 300


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI: apt-get install -y chromium)")
def test_page_in_headless_chromium(gallery, tmp_path):
    folder, rows = gallery
    url = (folder / "out" / "index.html").as_uri()
    result = chromium("--dump-dom", "--virtual-time-budget=5000", url, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    page = Page()
    page.feed(result.stdout)
    # The injected script did not run and no markup from captions or paths became elements.
    assert page.title == "Caption gallery"
    assert page.scripts == 0 and "pwned" not in page.ids
    # Every sampled image is on the page with all its captions, as text.
    assert sorted(t["alt"] for t in page.thumbs) == sorted(r["image"] for r in rows[:4])
    assert len(page.cells) == 5 * 4
    texts = [cell["text"] for cell in page.cells]
    for row in rows:
        for caption in row["caption"][1:]:
            if caption:
                assert any(text.endswith(caption) for text in texts), caption
    attacked = [cell for cell in page.cells if ATTACK in cell["text"]]
    assert len(attacked) == 4 and all("truncated" in cell["flags"] for cell in attacked)
    refusals = [cell for cell in page.cells if "refusal" in cell["flags"]]
    assert len(refusals) == 4 and all("flagged" in cell["class"] for cell in refusals)
    assert "image not shown" in result.stdout and "img/missing.png" in result.stdout

    # The thumbnails really render: each colour covers a thumbnail-sized area of the screenshot.
    shot = tmp_path / "shot.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1600,2400", "--hide-scrollbars",
                      "--virtual-time-budget=5000", url, tmp_path=tmp_path)
    assert shot.exists(), result.stderr
    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 24)
    for name, color in COLORS.items():
        close = sum(count for count, c in colors if sum(abs(a - b) for a, b in zip(c, color)) < 60)
        assert close > 100 * 100, f"{name} thumbnail not rendered ({close} pixels)"


def test_composed_inputs_joined_by_image(tmp_path):
    """Several composed files: one source each, joined by image; the sample comes from the first."""
    for n, name in enumerate(["a", "b"]):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "composed.jsonl", "w") as f:
            for i in range(30):
                if name == "a" or i % 2 == 0:
                    f.write(json.dumps({"image": f"{i}.png", "caption": f"{name} caption {i}."}) + "\n")
    run_gallery(tmp_path / "a", tmp_path / "b" / "composed.jsonl", "--output-dir", tmp_path / "out",
                "--sample", "6", "--seed", "1")
    text = (tmp_path / "out" / "index.html").read_text()
    shown = [i for i in range(30) if f">{i}.png<" in text]
    assert len(shown) == 6
    for i in shown:
        assert f"a caption {i}." in text
        assert (f"b caption {i}." in text) == (i % 2 == 0)
    assert text.count("(no caption)") == sum(i % 2 for i in shown)
    # The same --seed gives the same sample.
    run_gallery(tmp_path / "a", tmp_path / "b", "--output-dir", tmp_path / "again", "--sample", "6", "--seed", "1")
    assert [i for i in range(30) if f">{i}.png<" in (tmp_path / "again" / "index.html").read_text()] == shown


def test_gallery_errors(tmp_path):
    result = run_gallery(tmp_path / "nope", "--output-dir", tmp_path / "out", ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"gallery.py: error: no such file or folder: {tmp_path / 'nope'}"
    (tmp_path / "bad.jsonl").write_text("not json\n")
    result = run_gallery(tmp_path / "bad.jsonl", "--output-dir", tmp_path / "out", ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "bad.jsonl" in result.stderr


def colour_png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


def write_multi(path, ids):
    with open(path, "w") as f:
        for image in ids:
            f.write(json.dumps({"image": image, "caption": [f"web {image}", f"A picture of {image}."]}) + "\n")


def thumb_colours(out):
    """The colour of each thumbnail the page shows, in page order."""
    text = (out / "index.html").read_text()
    names = sorted(os.listdir(out / "thumbs"))
    assert all(f'src="thumbs/{name}"' in text for name in names)
    colours = []
    for name in names:
        with Image.open(out / "thumbs" / name) as thumb:
            colours.append(max(thumb.convert("RGB").getcolors(1 << 16))[1])
    return colours


def close_to(a, b):
    return sum(abs(x - y) for x, y in zip(a, b)) < 30


def test_relative_ids_found_from_the_captioning_input(tmp_path):
    """Captioning resolved data/input.json's paths from data/; so does the gallery given that input, wherever
    the multi-caption file is and whatever the current folder (the tests run from the repository)."""
    os.makedirs(tmp_path / "data" / "img")
    names = [f"img/{name}.png" for name in COLORS]
    for name, color in zip(names, COLORS.values()):
        Image.new("RGB", (64, 48), color).save(tmp_path / "data" / name)
    (tmp_path / "data" / "input.json").write_text(json.dumps([{"image": name} for name in names]))
    write_multi(tmp_path / "multi.jsonl", names)
    result = run_gallery(tmp_path / "multi.jsonl", "--output-dir", tmp_path / "out", "--input-json",
                         tmp_path / "data" / "input.json")
    assert "4 images (4 shown, 0 unreadable)" in result.stdout
    shown = thumb_colours(tmp_path / "out")  # JPEG thumbnails: the colours within a few levels
    assert all(any(close_to(colour, c) for colour in shown) for c in COLORS.values())
    result = run_gallery(tmp_path / "multi.jsonl", "--output-dir", tmp_path / "lost")
    assert "4 images (0 shown, 4 unreadable)" in result.stdout
    assert "pass --input-json (the captioning input) or --image-root" in result.stderr


def test_images_straight_from_shards_and_parquet(tmp_path):
    """Ids of tar members and Parquet rows, as captioning writes them (utils/input_reader.py), shown from the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sample_images import write_tar_shard
    from utils.input_reader import expand_inputs, iter_samples

    colours = list(COLORS.values())
    os.makedirs(tmp_path / "shards")
    write_tar_shard(tmp_path / "shards" / "00000.tar", [(f"{n:09d}", {"png": colour_png(c), "txt": "web"})
                                                       for n, c in enumerate(colours[:2])])
    write_tar_shard(tmp_path / "shards" / "00001.tar", [(f"{n:09d}", {"png": colour_png(c), "txt": "web"})
                                                       for n, c in enumerate(colours[2:], 2)])
    os.makedirs(tmp_path / "parquet")
    images = pa.array([{"bytes": colour_png(c), "path": None} for c in colours],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "text": ["web"] * 4}), tmp_path / "parquet" / "train.parquet",
                   row_group_size=3)
    for kind in ("shards", "parquet"):
        inputs = expand_inputs(str(tmp_path / kind))
        ids = [sample.image for sample in iter_samples(inputs, inputs.root)]
        write_multi(tmp_path / f"{kind}.jsonl", ids)
        result = run_gallery(tmp_path / f"{kind}.jsonl", "--output-dir", tmp_path / f"out-{kind}", "--input-json",
                             tmp_path / kind, "--seed", "1")
        assert "4 images (4 shown, 0 unreadable)" in result.stdout, result.stdout
        text = (tmp_path / f"out-{kind}" / "index.html").read_text()
        order = sorted(ids, key=text.index)  # the sample's order on the page
        shown = thumb_colours(tmp_path / f"out-{kind}")
        assert all(close_to(shown[n], colours[ids.index(image)]) for n, image in enumerate(order)), (kind, shown)
