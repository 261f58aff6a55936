"""The multi-caption result as webdataset tar shards, for training loaders (webdataset, open_clip).

Each sample holds three members:
    KEY.<ext>    the image bytes exactly as the input holds them (a file, a tar member, a Parquet row)
    KEY.json     {"key", "image": the image id, "caption": [original, generated...], "truncated": [...]}
    KEY.txt      the original caption, for loaders that read one caption per image
Where the input was tar shards the output mirrors them: a sample of input shard S.tar goes to OUT/S.tar (its
path relative to the folder holding the input shards) under its input key, and every input shard gets its
output shard, empty when none of its samples is left, so one brace pattern names both. Otherwise the shards
are 00000.tar, 00001.tar, ... of `shard_size` samples, keys 000000000, 000000001, ... in row order (a
Parquet key such as file.parquet:17 cannot be a webdataset key: the first dot starts the extension).

Rows come in input order and are written one at a time, so memory holds one sample; a shard is written as
NAME.tar.partial and renamed when it is complete.
"""
import io
import json
import os
import tarfile

from PIL import Image

from utils.images import UnreadableImage
from utils.input_reader import read_image_bytes, split_container
from utils.tar_shards import IMAGE_EXTENSIONS, key_and_extension

PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class OutputFolderInUse(ValueError):
    """The output folder already holds shards; the message names it."""


def image_extension(image, data):
    """The extension of a sample's image member: the file's own where it is an image extension, else the
    format PIL finds in the bytes (a Parquet row holds bare bytes)."""
    extension = os.path.splitext(image)[1][1:].lower()
    if extension in IMAGE_EXTENSIONS:
        return extension
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            return PIL_EXTENSIONS.get(decoded.format, decoded.format.lower())
    except (OSError, ValueError):
        raise UnreadableImage("not an image file") from None


class WebdatasetOutput:
    """Writes joined multi-caption rows (JSON lines, in input order) as tar shards into a folder."""

    def __init__(self, folder, inputs, image_root, shard_size):
        if os.path.isdir(folder) and any(name.endswith(".tar") for name in os.listdir(folder)):
            raise OutputFolderInUse(f"{folder} already holds .tar shards: remove them or choose another --output")
        self.folder, self.image_root, self.shard_size = folder, image_root, shard_size
        self.input_shards = inputs.files if inputs.kind == "tar" else None
        self.input_root = inputs.root
        self.tar = self.shard = None
        self.written = set()
        self.samples = self.unreadable = 0

    def write(self, line):
        row = json.loads(line)
        image = row["image"]
        try:
            data = read_image_bytes(image, self.image_root)
            shard, key, extension = self.place(image, data)
        except UnreadableImage:
            self.unreadable += 1  # captioned once, unreadable now (moved, deleted): counted and left out
            return
        self.open_shard(shard)
        self.add(f"{key}.{extension}", data)
        record = {"key": key, "image": image, "caption": row["caption"], "truncated": row["truncated"]}
        self.add(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())
        self.add(f"{key}.txt", row["caption"][0].encode())
        self.samples += 1

    def place(self, image, data):
        """(output shard relative to the folder, key, image extension) of one sample."""
        if self.input_shards is None:
            number = self.samples
            return f"{number // self.shard_size:05d}.tar", f"{number:09d}", image_extension(image, data)
        shard, member = split_container(image, self.image_root)
        if shard is None:
            raise UnreadableImage("not a member of the input shards")
        key, extension = key_and_extension(member)
        return self.mirrored(shard), key, extension

    def mirrored(self, input_shard):
        """The output shard of an input shard: its path relative to the folder holding the input shards."""
        return os.path.relpath(os.path.abspath(input_shard), os.path.abspath(self.input_root))

    def open_shard(self, shard):
        if shard == self.shard:
            return
        self.close_shard()
        path = os.path.join(self.folder, shard)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.tar, self.shard = tarfile.open(path + ".partial", "w"), shard

    def add(self, name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def close_shard(self):
        if self.tar is not None:
            self.tar.close()
            path = os.path.join(self.folder, self.shard)
            os.replace(path + ".partial", path)
            self.written.add(self.shard)
            self.tar = self.shard = None

    def close(self):
        """Finish the last shard and write the mirrored shards that got no sample; -> counts for the summary."""
        self.close_shard()
        for path in self.input_shards or ():
            shard = self.mirrored(path)
            if shard not in self.written:
                self.open_shard(shard)
                self.close_shard()
        return {"shards": len(self.written), "samples": self.samples, "unreadable": self.unreadable}
