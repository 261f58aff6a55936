"""What the input is, and this process's part of it: JSON/JSONL lists of paths, webdataset tar shards, Parquet.

    expand_inputs(spec) -> Inputs(kind, files, root)    a JSON/JSONL file, a .tar file, a folder of .tar files, a
                                                        brace pattern (data/{00000..01242}.tar) or a glob, or
                                                        Parquet files (also a Hub dataset folder: data/*.parquet)
    read_part(spec, rank, world, limit, image_root)     this process's entries, a summary of the input, the root
    read_image_bytes(image_id, image_root)              the one way from an image id to its bytes

Image ids, the "image" of every output line, are stable strings relative to the image root: a JSON entry's path as
written; a tar member as <shard>/<member name> (00000.tar/000000123.jpg); a Parquet row as <file>/<row> (rows from
0), or its path column. Keys: a tar sample's webdataset key; a Parquet row's `key` or `id` column, else <file>:<row>.

One split rule for every kind (part_bounds): part r of n takes [r*total//n, (r+1)*total//n) of the entries of a
JSON input, of the rows of Parquet files, or of the bytes of tar shards laid end to end (a sample belongs to the
part whose range holds its first header, so a process reads only the headers of the shards its range touches).
"""
import bisect
import functools
import gc
import glob
import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from utils.errors import InputError, UserError
from utils.images import read_file
from utils.parquet_files import parquet_layout, read_parquet_image, read_rows
from utils.records import RecordError, detect_format, iter_json_array, iter_json_lines, iter_records
from utils.tar_shards import image_member, open_tar, read_tar_image, sample_starts, tar_original

_CONTAINERS = (".tar", ".parquet")
# Output line fields written by the loop; input keys of the same name are kept as "input_<key>".
OUTPUT_FIELDS = ("image", "caption", "model", "prompt", "truncated")


class Inputs(NamedTuple):
    kind: str  # "json", "tar" or "parquet"
    files: list  # in input order
    root: str  # default image root: the folder that image ids are relative to


class Sample(NamedTuple):
    image: str  # the stable image id
    key: str
    caption: object  # the original caption (str), or None: not asked for or not there
    metadata: dict  # the fields of a tar sample's .json member, a Parquet row's scalar columns; {} unless asked for


def expand_braces(pattern):
    """Expand {a,b,c} lists and {00000..01242} ranges (zero-padded as written) like webdataset's braceexpand."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = max(len(first), len(last)) if first.startswith("0") or last.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise InputError(f"{pattern}: braces hold neither a list {{a,b}} nor a range {{00000..00099}}")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def kind_of(path):
    lower = path.lower()
    return "tar" if lower.endswith(".tar") else "parquet" if lower.endswith(".parquet") else None


def _common_folder(files):
    return os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])


# How the Hub names splits in a dataset's data/ folder, in the order its viewer lists them.
_HUB_SPLITS = {"train": 0, "training": 0, "validation": 1, "valid": 1, "val": 1, "dev": 1, "test": 2, "testing": 2}


def hub_split(relative_path):
    """The split a Parquet file under data/ belongs to: its folder (data/train/...) or its name's first part
    (data/train-00000-of-00002.parquet)."""
    parts = relative_path.replace(os.sep, "/").split("/")
    return parts[0] if len(parts) > 1 else re.split(r"[-_.]", parts[0])[0]


def hub_parquet_files(folder):
    """The Parquet files of a dataset folder in the Hub layout (data/<split>-NNNNN-of-NNNNN.parquet or
    data/<split>/*.parquet): train first, then validation, then test, then any other split, each in name order."""
    data = os.path.join(folder, "data")
    found = [os.path.relpath(os.path.join(root, name), data) for root, _, names in os.walk(data)
             for name in names if name.lower().endswith(".parquet")]
    def order(path):
        split = hub_split(path)
        return _HUB_SPLITS.get(split.lower(), 3), split, path
    return [os.path.join(data, path) for path in sorted(found, key=order)]


def expand_inputs(spec):
    """The kind of input `spec` names and its files in order (see the module docstring)."""
    if os.path.isdir(spec):
        names = sorted(os.listdir(spec))
        for kind, suffix in (("tar", ".tar"), ("parquet", ".parquet")):
            files = [os.path.join(spec, n) for n in names if n.lower().endswith(suffix)
                     and os.path.isfile(os.path.join(spec, n))]
            if files:
                return Inputs(kind, files, _common_folder(files))
        files = hub_parquet_files(spec) if os.path.isdir(os.path.join(spec, "data")) else []
        if files:
            return Inputs("parquet", files, _common_folder(files))
        raise InputError(f"{spec}: a folder without .tar or .parquet files (nor a data/ folder of .parquet files)")
    if os.path.isfile(spec):
        kind = kind_of(spec) or "json"
        return Inputs(kind, [spec], _common_folder([spec]))
    if glob.has_magic(spec):
        files = sorted(glob.glob(spec, recursive=True))
        if not files:
            raise InputError(f"{spec}: the pattern matches no file")
    elif "{" in spec:
        files = expand_braces(spec)
    else:
        raise InputError(f"{spec}: no such file or folder")
    kinds = {kind_of(f) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise InputError(f"{spec}: a pattern must name .tar files or .parquet files only")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise InputError(f"{spec}: {len(missing)} of {len(files)} files do not exist (first: {missing[0]}); "
                         "give their folder to take the ones that do")
    return Inputs(kinds.pop(), files, _common_folder(files))


def check_inputs(inputs):
    """Open each file's first tar header or Parquet footer; a one-line summary of the input."""
    if inputs.kind == "tar":
        for path in inputs.files:
            open_tar(path).close()
        size = sum(os.path.getsize(f) for f in inputs.files)
        return f"{len(inputs.files)} tar shard{'s' * (len(inputs.files) != 1)}, {size / 1e9:.1f} GB"
    if inputs.kind == "parquet":
        rows = sum(parquet_layout(f).rows for f in inputs.files)
        return f"{len(inputs.files)} Parquet file{'s' * (len(inputs.files) != 1)}, {rows} rows"
    raise ValueError(f"check_inputs reads tar shards and Parquet files, not {inputs.kind}")


@functools.lru_cache(maxsize=1024)
def _id_prefix(path, image_root):
    """A shard or Parquet file as image ids name it: relative to the image root, with '/'."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(image_root)).replace(os.sep, "/")


def iter_samples(inputs, image_root, rank=0, world=1, limit=None, originals=False):
    """This rank's samples of tar shards or Parquet files, in input order (see the module docstring); with
    `originals`, each with its original caption and metadata."""
    if inputs.kind == "tar":
        for path, sample in tar_part(inputs.files, rank, world, limit):
            member = image_member(sample)
            image = f"{_id_prefix(path, image_root)}/{member.name if member else sample.key}"
            caption, metadata = tar_original(path, sample) if originals else (None, {})
            yield Sample(image, sample.key, caption, metadata)
    elif inputs.kind == "parquet":
        yield from parquet_part(inputs.files, image_root, rank, world, limit, originals)
    else:
        raise ValueError(f"iter_samples reads tar shards and Parquet files, not {inputs.kind}")


def part_bounds(total, rank, world):
    return rank * total // world, (rank + 1) * total // world


def tar_part(files, rank, world, limit):
    """(shard, TarSample) of the samples whose first header lies in this rank's byte range."""
    sizes = [os.path.getsize(f) for f in files]
    bases = list(itertools.accumulate(sizes, initial=0))[:-1]  # where each shard starts, shards laid end to end
    end = sum(sizes)
    if limit is not None:  # the byte where sample number `limit` starts: only the first `limit` come before it
        after_limit = next(itertools.islice(sample_starts(files, bases), limit, None), None)
        end = end if after_limit is None else after_limit[0]
    low, high = part_bounds(end, rank, world)
    touched = [i for i in range(len(files)) if bases[i] < high and bases[i] + sizes[i] > low]
    for position, path, sample in sample_starts([files[i] for i in touched], [bases[i] for i in touched]):
        if position >= high:
            break
        if position >= low:
            yield path, sample


def parquet_part(files, image_root, rank, world, limit, originals):
    layouts = [parquet_layout(f) for f in files]
    total = sum(layout.rows for layout in layouts)
    low, high = part_bounds(total if limit is None else min(limit, total), rank, world)
    base = 0
    for path, layout in zip(files, layouts):
        start, stop = max(low - base, 0), min(high - base, layout.rows)
        base += layout.rows
        if start >= stop:
            continue
        prefix = _id_prefix(path, image_root)
        path_column = layout.image if layout.image_kind == "path" else None
        wanted = [layout.caption, *layout.scalars] if originals else []
        columns = list(dict.fromkeys(c for c in (layout.key, path_column, *wanted) if c))
        for row, values in read_rows(path, layout, columns, start, stop):
            key, image = values.get(layout.key), values.get(path_column)
            metadata = {name: _json_safe(values[name]) for name in layout.scalars} if originals else {}
            yield Sample(image if image else f"{prefix}/{row}", f"{prefix}:{row}" if key is None else str(key),
                         values.get(layout.caption), metadata)


def _json_safe(value):
    """A column value as JSON holds it: NaN and infinities, which JSON has not, as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def split_container(image_id, image_root):
    """(the tar or Parquet file an id names, the rest of the id), or (None, None) for a plain file."""
    parts = image_id.split("/")
    for i, part in enumerate(parts[:-1]):
        if part.lower().endswith(_CONTAINERS):
            container = os.path.join(image_root, "/".join(parts[:i + 1]))
            if os.path.isfile(container):
                return container, "/".join(parts[i + 1:])
    return None, None


def read_image_bytes(image_id, image_root):
    """The bytes of the image an id names (a file, a tar member, a Parquet row), relative to image_root.

    Raises UnreadableImage with the reason to record. Each process keeps the member index of its last
    few shards and one streaming reader per Parquet file, so reading ids in input order is cheap.
    """
    container, inner = split_container(image_id, image_root)
    if container is None:
        return read_file(os.path.join(image_root, image_id))
    if kind_of(container) == "tar":
        return read_tar_image(container, inner)
    return read_parquet_image(container, inner, image_root)


def in_bulk(make):
    """For a function that makes millions of small objects that hold no cycles (a part's entries, the work left): the
    cycle collector, which would trace them again each time its counters fill as they pile up, is paused, and
    what it tracks is frozen out of its later passes (the captioning loop's)."""
    @functools.wraps(make)
    def made_in_bulk(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return make(*args, **kwargs)
        finally:
            gc.freeze()
            if was_enabled:
                gc.enable()
    return made_in_bulk


@in_bulk
def read_part(spec, rank, world, limit, image_root=None, marks_folder=None):
    """This process's part of the input as [(image id, extra keys or None)], a one-line summary of the input, and
    the image root (image_root, else the folder the input's ids are relative to). A JSON input is validated whole;
    tar shards and Parquet files are checked file by file, each sample's extra keys being {"key"}."""
    inputs = expand_inputs(spec)
    image_root = image_root or inputs.root
    if inputs.kind == "json":
        entries, summary = read_json_part(spec, rank, world, limit, marks_folder)
        return entries, summary, image_root
    summary = check_inputs(inputs)
    samples = iter_samples(inputs, image_root, rank, world, limit)
    return [(sample.image, {"key": sample.key}) for sample in samples], summary, image_root


def check_input(spec, limit, marks_folder=None):
    """--check-input: the input's one-line summary, after validating a JSON input whole (a JSON array's marks then
    kept for the processes) or opening each shard or Parquet file (reading none through: each process's work)."""
    inputs = expand_inputs(spec)
    if inputs.kind != "json":
        return check_inputs(inputs)
    try:
        if limit is None and detect_format(spec) == "array":
            return f"{array_marks(spec, marks_folder)[0]} images"
    except RecordError as e:
        raise UserError(str(e)) from None
    return f"{sum(1 for _ in checked_entries(spec, iter_records(spec), limit))} images"


def checked_entries(path, records, limit=None):
    """The entries of a JSON array or JSONL input, each checked: an object with an "image" path."""
    try:
        for index, record in enumerate(records):
            if limit is not None and index >= limit:
                return
            if not isinstance(record, dict):
                raise UserError(f"{path}: entry {index} is not an object like {{\"image\": path}}")
            if not isinstance(record.get("image"), str) or not record["image"]:
                raise UserError(f"{path}: entry {index} has no \"image\" path")
            yield record
    except RecordError as e:
        raise UserError(str(e)) from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


def json_part_records(path, rank, world, limit, marks_folder=None):
    """This process's records of a JSON input and the summary. JSONL is cut by bytes: a process reads and checks
    only its own lines. A JSON array is scanned whole once, counting and checking its elements and marking where
    every few thousandth begins (kept in marks_folder for the next process); the part's elements are then read from
    the mark before them."""
    try:
        kind = detect_format(path)
    except RecordError as e:
        raise UserError(str(e)) from None
    if kind == "lines" and limit is None:
        size = os.path.getsize(path)
        records = (record for _, record in iter_json_lines(path, byte_range=part_bounds(size, rank, world)))
        return checked_entries(path, records), f"{size / 1e6:.1f} MB of JSONL"
    if kind == "lines":
        total = sum(1 for _ in checked_entries(path, iter_records(path), limit))
        start, stop = part_bounds(total, rank, world)
        return itertools.islice(checked_entries(path, iter_records(path)), start, stop), f"{total} images"
    if limit is None:
        total, marks = array_marks(path, marks_folder)
    else:  # only the first `limit` entries are checked
        marks = []
        total = sum(1 for _ in checked_entries(path, iter_json_array(path, marks=marks), limit))
    start, stop = part_bounds(total, rank, world)
    mark = marks[bisect.bisect_right(marks, start, key=lambda m: m[1]) - 1] if marks else None  # marks[0]: element 0
    first = mark[1] if mark else 0
    records = checked_entries(path, iter_json_array(path, start=mark))
    return itertools.islice(records, start - first, stop - first), f"{total} images"


def array_marks(path, marks_folder):
    """(elements, [(byte, index) of an element, MARK_EVERY or more apart]) of a JSON array, every element checked;
    kept in marks_folder (beside the outputs: the input's folder may be read-only) while the file is unchanged."""
    stat = os.stat(path)
    key = [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]
    kept = None
    if marks_folder is not None:
        kept = Path(marks_folder) / (hashlib.sha1(json.dumps(key).encode()).hexdigest()[:20] + ".json")
        try:
            record = json.loads(kept.read_text())
            if record["file"] == key:
                return record["elements"], [tuple(mark) for mark in record["marks"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or not one of ours: scan
    marks = []
    elements = sum(1 for _ in checked_entries(path, iter_json_array(path, marks=marks)))
    if kept is not None:
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            temporary = kept.with_name(f".{kept.name}.{os.getpid()}")
            temporary.write_text(json.dumps({"file": key, "elements": elements, "marks": marks}))
            os.replace(temporary, kept)
        except OSError:
            pass  # the next process scans again
    return elements, marks


def read_json_part(path, rank, world, limit, marks_folder=None):
    """This process's part of a JSON input as [(image, extra keys or None)], and the input's summary."""
    records, summary = json_part_records(path, rank, world, limit, marks_folder)
    part = []
    for record in records:
        extra = {(f"input_{k}" if k in OUTPUT_FIELDS else k): v for k, v in record.items() if k != "image"}
        part.append((record["image"], extra or None))
    return part, summary
