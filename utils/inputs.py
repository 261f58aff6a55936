"""Captioning inputs as users store them: JSON/JSONL lists of paths, webdataset tar shards, Parquet files.

    expand_inputs(spec) -> Inputs(kind, files, root)
        spec: a JSON/JSONL file (kind "json"); a .tar file, a folder of .tar files or a brace pattern such as
        data/{00000..01242}.tar (kind "tar"); a .parquet file or a folder of them (kind "parquet").
        root: the default image root, the folder that image ids are relative to (the JSON file's folder,
        or the deepest folder holding all shards or Parquet files).
    check_inputs(inputs) -> "12 tar shards, 3.1 GB"
        opens every file's first tar header or Parquet footer: a wrong file is an InputError now, not later.
    iter_samples(inputs, image_root, rank, world, limit, captions) -> Sample(image, key, caption), ...
        the samples of tar shards or Parquet files that rank `rank` of `world` captions, in input order;
        caption (the original one) only when captions=True.
    read_image_bytes(image_id, image_root) -> bytes
        the one way to get an image from its id (captioning workers, gallery, webdataset writer);
        raises UnreadableImage with the reason to record.
    iter_tar_samples(path) -> TarSample(key, offset, members), ...; image_member(sample); read_member(path,
    member); tar_caption(path, sample): the tar shard reader underneath.
    split_container(image_id, image_root) -> (tar or Parquet file, member name or row), or (None, None);
    key_and_extension(member name) -> (webdataset key, extension): what the webdataset output needs to mirror
    input shards.

Image ids, the "image" of every output line, are stable strings relative to the image root:
    tar member        <shard>/<member name>, e.g. 00000.tar/000000123.jpg (a sample without an image
                      member: <shard>/<key>, recorded as unreadable)
    Parquet row       <file>/<row>, e.g. train-00000.parquet/17 (row: 0-based row number in the file); a
                      string path column gives the path itself
    JSON entry        its "image" path as written; such a path may also name a tar member as above
Keys: the webdataset key of a tar sample; the `key` or `id` column of a Parquet row, else <file>:<row>.

Tar shards are read with the standard library's tarfile in random-access mode: a pass over a shard reads
its 512-byte headers and seeks over member data, and a reader seeks to one member and reads just its
bytes. The `webdataset` package streams whole samples (all member bytes) through a pipeline; it would add a
dependency and could give neither offsets nor a header-only pass. Samples are grouped as webdataset groups
them: regular members in file order, the key is the member path up to the first dot of its basename,
the extension the rest (lower-cased), and consecutive members with the same key form one sample (a
repeated extension starts a new one). The image is the first member whose extension ends in an image
extension (IMAGE_EXTENSIONS).

Splitting among ranks, deterministic and exactly once for any world size:
    tar      by bytes: the shards are laid end to end and cut into `world` equal byte ranges; a sample
             belongs to the rank whose range holds its first header. A rank reads only the headers of
             the shards its range touches (a shard it shares with a neighbour from the start), never
             counts the others, and ranks get about equal bytes. --limit N first finds where the N-th
             sample ends (headers of the first shards only) and splits the bytes before it.
    Parquet  by rows: the row counts come from the footers; rank r takes rows [r*n//world, (r+1)*n//world).
A shard damaged mid-way (tarfile cannot read a header) keeps the samples before the damage; the rest of
that shard is skipped with a warning on stderr.

Parquet is read with pyarrow in record batches of a few rows, never a whole file: the main process reads
only the key (and path or caption) columns; a worker streams the image column of one row group. Memory is
about one data page of the image column, which the writer decides (Hugging Face datasets writes row
groups of 100 images). The image column: `image` if it is a struct {bytes, path} (Hugging Face datasets),
binary or a string path; else the first struct {bytes, ...} or binary column; else a string `path` or
`file_name` column. A struct row without bytes reads its `path`. The original caption: `caption` or `text`.
"""
import bisect
import functools
import itertools
import json
import os
import re
import sys
import tarfile
from typing import NamedTuple

from utils.errors import UserError
from utils.images import UnreadableImage, read_file

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
_CONTAINERS = (".tar", ".parquet")
_BATCH_ROWS = 16  # Parquet rows per record batch: a few images' bytes at a time


class InputError(UserError):
    """The input cannot be read as given; the message is one line naming the file."""


class Inputs(NamedTuple):
    kind: str  # "json", "tar" or "parquet"
    files: list  # in input order
    root: str  # default image root: the folder that image ids are relative to


class Sample(NamedTuple):
    image: str  # the stable image id
    key: str
    caption: object  # the original caption (str), or None: not asked for or not there


class TarMember(NamedTuple):
    name: str  # the member's path in the tar
    offset: int  # where its data starts in the file
    size: int


class TarSample(NamedTuple):
    key: str
    offset: int  # where its first member's header starts in the file
    members: dict  # lower-case extension -> TarMember, in file order


class DamagedShard(InputError):
    """A shard whose headers stop making sense after some samples (cut off or corrupt)."""


# -- what the input is ------------------------------------------------------------------------------------

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


def _kind_of(path):
    lower = path.lower()
    return "tar" if lower.endswith(".tar") else "parquet" if lower.endswith(".parquet") else None


def _common_folder(files):
    return os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])


def expand_inputs(spec):
    """The kind of input `spec` names and its files in order (see the module docstring)."""
    if os.path.isdir(spec):
        names = sorted(os.listdir(spec))
        for kind, suffix in (("tar", ".tar"), ("parquet", ".parquet")):
            files = [os.path.join(spec, n) for n in names if n.lower().endswith(suffix)
                     and os.path.isfile(os.path.join(spec, n))]
            if files:
                return Inputs(kind, files, _common_folder(files))
        raise InputError(f"{spec}: a folder without .tar or .parquet files")
    if os.path.isfile(spec):
        kind = _kind_of(spec) or "json"
        return Inputs(kind, [spec], _common_folder([spec]))
    if "{" not in spec:
        raise InputError(f"{spec}: no such file or folder")
    files = expand_braces(spec)
    kinds = {_kind_of(f) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise InputError(f"{spec}: a brace pattern must name .tar files or .parquet files only")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise InputError(f"{spec}: {len(missing)} of {len(files)} files do not exist (first: {missing[0]}); "
                         "give their folder to take the ones that do")
    return Inputs(kinds.pop(), files, _common_folder(files))


def check_inputs(inputs):
    """Open each file's first tar header or Parquet footer; a one-line summary of the input."""
    if inputs.kind == "tar":
        for path in inputs.files:
            _open_tar(path).close()
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


def iter_samples(inputs, image_root, rank=0, world=1, limit=None, captions=False):
    """This rank's samples of tar shards or Parquet files, in input order (see the module docstring)."""
    if inputs.kind == "tar":
        for path, sample in _tar_slice(inputs.files, rank, world, limit):
            member = image_member(sample)
            image = f"{_id_prefix(path, image_root)}/{member.name if member else sample.key}"
            yield Sample(image, sample.key, tar_caption(path, sample) if captions else None)
    elif inputs.kind == "parquet":
        yield from _parquet_slice(inputs.files, image_root, rank, world, limit, captions)
    else:
        raise ValueError(f"iter_samples reads tar shards and Parquet files, not {inputs.kind}")


def _bounds(total, rank, world):
    return rank * total // world, (rank + 1) * total // world


# -- tar shards -------------------------------------------------------------------------------------------

def _open_tar(path):
    try:
        return tarfile.open(path, "r:")  # random access, uncompressed: next() seeks over member data
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{path}: not a readable tar file ({e})") from None


def key_and_extension(name):
    """webdataset's split of a member path: (key, lower-case extension), or None when it has no extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def iter_tar_samples(path):
    """The samples of one tar shard in file order; DamagedShard after the last readable one."""
    with _open_tar(path) as tar:
        sample, damage = None, None
        while True:
            try:
                info = tar.next()  # the next header; TarFile keeps one small TarInfo per member until closed
            except tarfile.TarError as e:
                damage = DamagedShard(f"{path}: damaged at byte {tar.offset} ({e})")
                break
            if info is None:  # the end-of-archive zero blocks, or a header tarfile could not parse
                damage = _damage_after_end(tar, path)
                break
            split = key_and_extension(info.name) if info.isreg() else None
            if split is None:
                continue  # not a sample's file: a folder, a name without an extension
            key, extension = split
            if sample is not None and (key != sample.key or extension in sample.members):
                yield sample
                sample = None
            if sample is None:
                sample = TarSample(key, info.offset, {})
            sample.members[extension] = TarMember(info.name, info.offset_data, info.size)
        if sample is not None:
            yield sample
        if damage is not None:
            raise damage


def _damage_after_end(tar, path):
    """A DamagedShard when what follows the last member is not zeros: tarfile ends quietly at a bad header."""
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(1 << 16).strip(b"\0"):
        return DamagedShard(f"{path}: damaged at byte {tar.offset} (not a tar header)")
    return None


def image_member(sample):
    """The first member whose extension ends in an image extension, or None."""
    for extension, member in sample.members.items():
        if extension.rpartition(".")[2] in IMAGE_EXTENSIONS:
            return member
    return None


def read_member(path, member):
    """The bytes of one member of a tar shard, read without touching the others."""
    try:
        with open(path, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
    except OSError as e:
        raise UnreadableImage(f"cannot read {path}: {e.strerror}") from None
    if len(data) < member.size:
        raise UnreadableImage(f"member cut off: {len(data)} of {member.size} bytes in the shard")
    return data


def tar_caption(path, sample):
    """The sample's original caption: its .txt member, else "caption" in its .json member, else None."""
    try:
        if "txt" in sample.members:
            return read_member(path, sample.members["txt"]).decode("utf-8", errors="replace")
        if "json" in sample.members:
            caption = json.loads(read_member(path, sample.members["json"])).get("caption")
            return caption if isinstance(caption, str) else None
    except (UnreadableImage, ValueError, AttributeError):
        pass  # a broken or odd member: no original caption
    return None


def _warn(damage):
    print(f"warning: {damage}; the rest of this shard is skipped", file=sys.stderr, flush=True)


def _shard_starts(files, bases):
    """(global byte position of each sample's start, shard path, TarSample) over all shards, in order."""
    for path, base in zip(files, bases):
        try:
            for sample in iter_tar_samples(path):
                yield base + sample.offset, path, sample
        except DamagedShard as damage:
            _warn(damage)


def _tar_slice(files, rank, world, limit):
    """(shard, TarSample) of the samples whose first header lies in this rank's byte range."""
    sizes = [os.path.getsize(f) for f in files]
    bases = list(itertools.accumulate(sizes, initial=0))[:-1]  # where each shard starts, shards laid end to end
    end = sum(sizes)
    if limit is not None:  # the byte where sample number `limit` starts: only the first `limit` come before it
        after_limit = next(itertools.islice(_shard_starts(files, bases), limit, None), None)
        end = end if after_limit is None else after_limit[0]
    low, high = _bounds(end, rank, world)
    touched = [i for i in range(len(files)) if bases[i] < high and bases[i] + sizes[i] > low]
    for position, path, sample in _shard_starts([files[i] for i in touched], [bases[i] for i in touched]):
        if position >= high:
            break
        if position >= low:
            yield path, sample


@functools.lru_cache(maxsize=4)
def _tar_index(path):
    """{member name: TarMember} and {key: [extensions]} of one shard: a worker's way from id to bytes."""
    members, keys = {}, {}
    try:
        for sample in iter_tar_samples(path):
            keys[sample.key] = list(sample.members)
            members.update((member.name, member) for member in sample.members.values())
    except DamagedShard:
        pass  # the planning pass warned; members after the damage have no ids
    return members, keys


def _read_tar_image(path, name):
    members, keys = _tar_index(path)
    if name in members:
        return read_member(path, members[name])
    if name in keys:
        raise UnreadableImage(f"sample {name} has no image member (it has: {', '.join(keys[name])})")
    raise UnreadableImage(f"no member {name} in the shard")


# -- Parquet ----------------------------------------------------------------------------------------------

class ParquetLayout(NamedTuple):
    image: str  # the image column
    image_kind: str  # "struct" ({bytes, path}), "binary" or "path"
    key: object  # the key column, or None
    caption: object  # the original caption column, or None
    group_starts: list  # first row of each row group, then the row count

    @property
    def rows(self):
        return self.group_starts[-1]


def _image_kind(arrow_type):
    import pyarrow as pa
    if pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "binary"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "path"
    return None


def _parquet_file(path):
    import pyarrow.parquet as pq
    # A small read buffer and no pre-buffering: pages stream in as batches need them, not whole column chunks.
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)


@functools.lru_cache(maxsize=64)
def parquet_layout(path):
    """Which columns hold the image, key and caption, and the row groups, from the footer alone."""
    try:
        parquet = _parquet_file(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    schema = parquet.schema_arrow
    kinds = {field.name: _image_kind(field.type) for field in schema}
    image = ("image" if kinds.get("image") else
             next((name for name, kind in kinds.items() if kind in ("struct", "binary")), None) or
             next((name for name in ("path", "file_name") if kinds.get(name) == "path"), None))
    if image is None:
        raise InputError(f"{path}: no image column (an `image` struct {{bytes, path}}, binary or path column; "
                         f"columns: {', '.join(schema.names)})")
    key = next((name for name in ("key", "id") if name in kinds and name != image), None)
    caption = next((name for name in ("caption", "text") if kinds.get(name) == "path" and name != image), None)
    counts = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
    return ParquetLayout(image, kinds[image], key, caption, list(itertools.accumulate(counts, initial=0)))


def _read_rows(path, layout, columns, start, stop):
    """(row, {column: value}) for rows start..stop-1 of one file, reading only `columns`, batch by batch."""
    if not columns:
        yield from ((row, {}) for row in range(start, stop))
        return
    groups = layout.group_starts
    first = bisect.bisect_right(groups, start) - 1
    row = groups[first]
    batches = _parquet_file(path).iter_batches(batch_size=256, row_groups=range(first, len(groups) - 1),
                                               columns=columns, use_threads=False)
    for batch in batches:
        values = batch.to_pydict()
        for i in range(batch.num_rows):
            if row >= stop:
                return
            if row >= start:
                yield row, {column: values[column][i] for column in columns}
            row += 1


def _parquet_slice(files, image_root, rank, world, limit, captions):
    layouts = [parquet_layout(f) for f in files]
    total = sum(layout.rows for layout in layouts)
    low, high = _bounds(total if limit is None else min(limit, total), rank, world)
    base = 0
    for path, layout in zip(files, layouts):
        start, stop = max(low - base, 0), min(high - base, layout.rows)
        base += layout.rows
        if start >= stop:
            continue
        prefix = _id_prefix(path, image_root)
        path_column = layout.image if layout.image_kind == "path" else None
        columns = [c for c in (layout.key, path_column, layout.caption if captions else None) if c]
        for row, values in _read_rows(path, layout, columns, start, stop):
            key, image = values.get(layout.key), values.get(path_column)
            yield Sample(image if image else f"{prefix}/{row}", f"{prefix}:{row}" if key is None else str(key),
                         values.get(layout.caption))


class _ParquetImages:
    """A worker's reader of one file's image column: streams forward through a row group, batch by batch,
    and starts the row group again only when asked for a row behind it."""

    def __init__(self, path):
        self.path, self.layout = path, parquet_layout(path)
        self.group = self.batches = self.batch = None
        self.batch_start = 0

    def value(self, row):
        """The image column's value at `row`: bytes, a {bytes, path} dict, a path or None."""
        groups = self.layout.group_starts
        if not 0 <= row < self.layout.rows:
            raise UnreadableImage(f"no row {row} in the file ({self.layout.rows} rows)")
        group = bisect.bisect_right(groups, row) - 1
        if group != self.group or row < self.batch_start:
            self.group, self.batch, self.batch_start = group, None, groups[group]
            self.batches = _parquet_file(self.path).iter_batches(
                batch_size=_BATCH_ROWS, row_groups=[group], columns=[self.layout.image], use_threads=False)
        while self.batch is None or row >= self.batch_start + len(self.batch):
            if self.batch is not None:
                self.batch_start += len(self.batch)
            self.batch = next(self.batches).column(0)
        return self.batch[row - self.batch_start].as_py()


@functools.lru_cache(maxsize=2)
def _parquet_images(path):
    return _ParquetImages(path)


def _read_parquet_image(path, row, image_root):
    if not row.isdigit():
        raise UnreadableImage(f"no row {row!r} in the file")
    value = _parquet_images(path).value(int(row))
    if isinstance(value, dict):  # a Hugging Face image: its bytes, else the file its path names
        value = value.get("bytes") or (read_file(os.path.join(image_root, value["path"])) if value.get("path")
                                       else None)
    elif isinstance(value, str):
        value = read_file(os.path.join(image_root, value))
    if value is None:
        raise UnreadableImage("no image in this row (null)")
    return value


# -- image bytes from an id -------------------------------------------------------------------------------

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
    if _kind_of(container) == "tar":
        return _read_tar_image(container, inner)
    return _read_parquet_image(container, inner, image_root)
