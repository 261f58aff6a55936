"""Reading images from Parquet files as Hugging Face datasets ship them, a record batch at a time.

The main process reads only the key (and path or caption) columns; a worker streams the image column of one row
group, so memory is about one data page of the image column (the writer decides its size). The image column:
`image` if it is a struct {bytes, path} (Hugging Face's Image feature), binary or a string path; else the first
struct {bytes, ...} or binary column; else a string `path` or `file_name` column. A struct row without bytes reads
its `path`. The key: the `key`, `id`, `uid` or `image_id` column. The original caption: `caption` or `text`. The
metadata: every other column of numbers, booleans or strings (a dataset's id, url, width, ...).
"""
import bisect
import functools
import itertools
import os
from typing import NamedTuple

from utils.errors import InputError
from utils.images import UnreadableImage, read_file

_BATCH_ROWS = 16  # Parquet rows per record batch: a few images' bytes at a time
KEY_COLUMNS = ("key", "id", "uid", "image_id")  # a dataset's own id, by the names datasets give it (DataComp: uid)


class ParquetLayout(NamedTuple):
    image: str  # the image column
    image_kind: str  # "struct" ({bytes, path}), "binary" or "path"
    key: object  # the key column, or None
    caption: object  # the original caption column, or None
    scalars: list  # the metadata columns: numbers, booleans and strings other than the image and caption
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


def _is_scalar(arrow_type):
    import pyarrow as pa
    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)
            or pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))


def parquet_file(path):
    import pyarrow.parquet as pq
    # A small read buffer and no pre-buffering: pages stream in as batches need them, not whole column chunks.
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)


@functools.lru_cache(maxsize=64)
def parquet_layout(path):
    """Which columns hold the image, key and caption, and the row groups, from the footer alone."""
    try:
        parquet = parquet_file(path)
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
    key = next((name for name in KEY_COLUMNS if name in kinds and name != image), None)
    caption = next((name for name in ("caption", "text") if kinds.get(name) == "path" and name != image), None)
    scalars = [field.name for field in schema if field.name not in (image, caption) and _is_scalar(field.type)]
    counts = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
    return ParquetLayout(image, kinds[image], key, caption, scalars, list(itertools.accumulate(counts, initial=0)))


def read_rows(path, layout, columns, start, stop):
    """(row, {column: value}) for rows start..stop-1 of one file, reading only `columns`, batch by batch."""
    if not columns:
        yield from ((row, {}) for row in range(start, stop))
        return
    groups = layout.group_starts
    first = bisect.bisect_right(groups, start) - 1
    row = groups[first]
    batches = parquet_file(path).iter_batches(batch_size=256, row_groups=range(first, len(groups) - 1),
                                               columns=columns, use_threads=False)
    for batch in batches:
        values = batch.to_pydict()
        for i in range(batch.num_rows):
            if row >= stop:
                return
            if row >= start:
                yield row, {column: values[column][i] for column in columns}
            row += 1


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
            self.batches = parquet_file(self.path).iter_batches(
                batch_size=_BATCH_ROWS, row_groups=[group], columns=[self.layout.image], use_threads=False)
        while self.batch is None or row >= self.batch_start + len(self.batch):
            if self.batch is not None:
                self.batch_start += len(self.batch)
            self.batch = next(self.batches).column(0)
        return self.batch[row - self.batch_start].as_py()


@functools.lru_cache(maxsize=2)
def _parquet_images(path):
    return _ParquetImages(path)


def read_parquet_image(path, row, image_root):
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
