"""The multi-caption result as webdataset tar shards, for training loaders (webdataset, open_clip, Hugging Face
datasets), and the reader of such shards (QA and gallery).

Each sample holds:
    KEY.<ext>           the image bytes exactly as the input holds them (a file, a tar member, a Parquet row)
    KEY.json            the joined row: {"key", "image": the image id, "caption": [...], "truncated": [...],
                        "sources": [...], ...the original's metadata}
    KEY.<source>.txt    one caption per source (original, detail, ...), for loaders that read one text member
    KEY.txt             the caption `text` chooses: a source's, or one drawn per sample with a seed
Where the input was tar shards the output mirrors them: a sample of input shard S.tar goes to OUT/S.tar (its
path relative to the folder holding the input shards) under its input key, and every input shard gets its
output shard, empty when none of its samples is left, so one brace pattern names both. Otherwise the shards
are 00000.tar, 00001.tar, ... of `shard_size` samples; a sample's key is the row's key (a Parquet id column)
where that is a webdataset key (no dot, no slash: the first dot starts the extension) not yet in its shard, else
its sample number, 000000000, 000000001, ... Every image member of a Parquet original carries the extension of the
first image's format (loaders decode by the bytes; Hugging Face's needs one member type per column).

Beside each shard, as img2dataset writes them: NAME.parquet (one row per sample: its KEY.json) and
NAME_stats.json; and in each folder of shards, sizes.json ({shard file name: samples}), which open_clip reads.
Rows come in input order and are written one at a time, so memory holds one shard's metadata; a shard is
written as NAME.tar.partial and renamed when it is complete.
"""
import hashlib
import io
import json
import os
import re
import tarfile
import time
from typing import NamedTuple

from PIL import Image

from utils.images import UnreadableImage
from utils.input_reader import expand_inputs, read_image_bytes, split_container
from utils.records import RecordError
from utils.tar_shards import IMAGE_EXTENSIONS, DamagedShard, iter_tar_samples, key_and_extension, read_member

PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
KEY_PATTERN = re.compile(r"[^./\\\s]+")  # what webdataset, open_clip and Hugging Face read back as one key
RANDOM_TEXT = "random"


class ShardOptions(NamedTuple):
    shard_size: int  # samples per shard where the input is not tar shards
    text: str  # the source whose caption is KEY.txt, or RANDOM_TEXT
    seed: int  # of the RANDOM_TEXT draw
    image_extension: object  # the extension of every image member, or None: as the module docstring says


class OutputFolderInUse(ValueError):
    """The output folder already holds shards; the message names it."""


def format_extension(data):
    """The extension of the format PIL finds in image bytes."""
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            return PIL_EXTENSIONS.get(decoded.format, decoded.format.lower())
    except (OSError, ValueError):
        raise UnreadableImage("not an image file") from None


def text_caption(row, options):
    """The caption KEY.txt holds, or None where the row lacks the chosen source (--missing keep-shorter)."""
    captions, sources = row["caption"], row["sources"]
    if options.text == RANDOM_TEXT:
        digest = hashlib.blake2b(f"{options.seed}\0{row['image']}".encode(), digest_size=8).digest()
        return captions[int.from_bytes(digest, "little") % len(captions)]
    return captions[sources.index(options.text)] if options.text in sources else None


def metadata_table(records):
    """One shard's KEY.json records as an Arrow table, a column per field; a field whose values have no one
    Arrow type (a number here, a string there) is kept as their JSON texts."""
    import pyarrow as pa
    names = list(dict.fromkeys(name for record in records for name in record))
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            columns[name] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                                     pa.string())
    return pa.table(columns)


def write_atomically(path, write):
    """write(temporary path), then the file under its name: a reader never sees half of it."""
    temporary = path + ".partial"
    write(temporary)
    os.replace(temporary, path)


def write_json(path, value):
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    write_atomically(path, write)


class WebdatasetOutput:
    """Writes joined multi-caption rows (JSON lines, in input order) as tar shards into a folder."""

    def __init__(self, folder, inputs, image_root, options):
        if os.path.isdir(folder) and any(name.endswith(".tar") for name in os.listdir(folder)):
            raise OutputFolderInUse(f"{folder} already holds .tar shards: remove them or choose another --output")
        self.folder, self.image_root, self.options = folder, image_root, options
        self.input_shards = inputs.files if inputs.kind == "tar" else None
        self.input_root = inputs.root
        self.parquet_rows, self.first_format = inputs.kind == "parquet", None
        self.tar = self.shard = None
        self.shard_keys, self.shard_records, self.shard_unreadable, self.shard_start = set(), [], 0, 0.0
        self.sizes = {}  # output shard -> samples
        self.samples = self.unreadable = 0

    def write(self, line):
        row = json.loads(line)
        shard = member = None
        if self.input_shards is not None:
            shard, member = split_container(row["image"], self.image_root)
            if shard is not None:
                self.open_shard(self.mirrored(shard))  # first: its rows' failures count in its stats
        try:
            data = read_image_bytes(row["image"], self.image_root)
            key, extension = self.member_name(row, member, data)
        except UnreadableImage:
            self.unreadable += 1  # captioned once, unreadable now (moved, deleted): counted and left out
            self.shard_unreadable += 1
            return
        if self.input_shards is None:
            self.open_shard(f"{self.samples // self.options.shard_size:05d}.tar")
            key = self.numbered_key(key)
        record = {"key": key, **{name: value for name, value in row.items() if name != "key"}}
        self.add(f"{key}.{extension}", data)
        self.add(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())
        for source, caption in zip(row["sources"], row["caption"]):
            self.add(f"{key}.{source}.txt", caption.encode())
        text = text_caption(row, self.options)
        if text is not None:
            self.add(f"{key}.txt", text.encode())
        self.shard_keys.add(key)
        self.shard_records.append(record)
        self.samples += 1

    def member_name(self, row, member, data):
        """(key, image extension): a mirrored sample's input key and extension (member: its path in its input
        shard); otherwise the row's key (checked by numbered_key) and image_extension's."""
        if self.input_shards is None:
            return row.get("key"), self.image_extension(row["image"], data)
        if member is None:
            raise UnreadableImage("not a member of the input shards")
        key, extension = key_and_extension(member) or (member, format_extension(data))
        return key, self.options.image_extension or extension

    def numbered_key(self, key):
        """The row's key where it is a webdataset key not yet in this shard, else the sample's number."""
        if isinstance(key, str) and KEY_PATTERN.fullmatch(key) and key not in self.shard_keys:
            return key
        return f"{self.samples:09d}"

    def image_extension(self, image, data):
        """--image-extension; else a file's own extension (where it is an image one: else the format in the
        bytes); a Parquet row's: the first row's format."""
        if self.options.image_extension:
            return self.options.image_extension
        name = image.rsplit("/", 1)[-1]
        if "." in name:
            own = name.rsplit(".", 1)[1].lower()
            return own if own in IMAGE_EXTENSIONS else format_extension(data)
        if self.parquet_rows:
            self.first_format = self.first_format or format_extension(data)
            return self.first_format
        return format_extension(data)

    def mirrored(self, input_shard):
        """The output shard of an input shard: its path relative to the folder holding the input shards."""
        return os.path.relpath(os.path.abspath(input_shard), os.path.abspath(self.input_root))

    def open_shard(self, shard):
        if shard == self.shard or shard is None:
            return
        self.close_shard()
        path = os.path.join(self.folder, shard)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.tar, self.shard = tarfile.open(path + ".partial", "w"), shard
        self.shard_start = time.time()

    def add(self, name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def close_shard(self):
        """The tar under its name, then its metadata .parquet and _stats.json beside it."""
        if self.shard is None:
            return
        import pyarrow.parquet as pq
        self.tar.close()
        path = os.path.join(self.folder, self.shard)
        os.replace(path + ".partial", path)
        stem = path[:-len(".tar")]
        write_atomically(stem + ".parquet", lambda p: pq.write_table(metadata_table(self.shard_records), p))
        end = time.time()
        stats = {"count": len(self.shard_records) + self.shard_unreadable, "successes": len(self.shard_records),
                 "failed_to_read": self.shard_unreadable, "start_time": self.shard_start, "end_time": end,
                 "duration": end - self.shard_start, "txt": self.options.text}
        write_json(stem + "_stats.json", stats)
        self.sizes[self.shard] = len(self.shard_records)
        self.tar = self.shard = None
        self.shard_keys, self.shard_records, self.shard_unreadable = set(), [], 0

    def close(self):
        """Finish the last shard, write the mirrored shards that got no sample and each folder's sizes.json;
        -> counts for the summary."""
        self.close_shard()
        for path in self.input_shards or ():
            shard = self.mirrored(path)
            if shard not in self.sizes:
                self.open_shard(shard)
                self.close_shard()
        by_folder = {}
        for shard, count in self.sizes.items():
            by_folder.setdefault(os.path.dirname(shard), {})[os.path.basename(shard)] = count
        for folder, sizes in by_folder.items():
            write_json(os.path.join(self.folder, folder, "sizes.json"), sizes)
        return {"shards": len(self.sizes), "samples": self.samples, "unreadable": self.unreadable}


def iter_shard_records(spec):
    """The KEY.json records of webdataset shards this module wrote (a .tar, a folder of them, a pattern), in order."""
    inputs = expand_inputs(spec)
    if inputs.kind != "tar":
        raise RecordError(f"{spec}: not webdataset shards")
    for path in inputs.files:
        try:
            for sample in iter_tar_samples(path):
                if "json" not in sample.members:
                    continue
                try:
                    record = json.loads(read_member(path, sample.members["json"]))
                except (UnreadableImage, ValueError):
                    raise RecordError(f"{path}: sample {sample.key}: its .json member is not JSON") from None
                if not isinstance(record, dict) or "image" not in record or "caption" not in record:
                    raise RecordError(f"{path}: sample {sample.key}: its .json member has no image and caption")
                yield record
        except DamagedShard as damage:
            raise RecordError(str(damage)) from None
