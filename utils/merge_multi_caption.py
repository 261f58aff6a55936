"""Join the original captions with generated ones into multi-caption JSONL (or webdataset shards) for
CLIP training.

    python utils/merge_multi_caption.py --original original.jsonl \\
        --index outputs/internvl/InternVL2-8B/detail --index outputs/internvl/InternVL2-8B/noun \\
        --output multi.jsonl
    python utils/merge_multi_caption.py --original 'cc3m/{00000..00331}.tar' --index ... \\
        --output-format webdataset --output cc3m-multi/

writes {"image": p, "caption": [original, c1, ..., cN], "truncated": [null, t1, ..., tN], "sources": [original,
n1, ..., nN], ...} in the original file's order, c1..cN in --index order; t1..tN are the indexes' truncated flags
(null where an index has none, as a composed_index.json), so caption_qa.py judges each caption as it did before;
n1..nN the indexes' names; then the original's key and metadata (the other fields of a JSONL line, a tar sample's
.json member, a Parquet row's scalar columns).
Memory stays bounded whatever the row count: the original and every index are split by a hash of the
image path into buckets on disk (temporary files, utils/hash_buckets.py), each bucket is joined on its
own (only one bucket's captions are in memory at a time), and the joined rows are put back in the
original order with the bucket number recorded for each original row.

The original is JSONL ({"image", "caption"} per line), or the captioning input itself when it is tar
shards (caption from KEY.txt, else "caption" in KEY.json) or Parquet (a caption or text column); its rows
carry the image ids that captioning wrote (utils/input_reader.py), relative to the same image root. With
--output-format webdataset the joined rows become tar shards (utils/webdataset_output.py).
"""
import contextlib
import json
import multiprocessing
import os
import re
import sys
import tempfile
from array import array

if not __package__:  # python utils/merge_multi_caption.py: makes utils importable (utils/as_package.py)
    import as_package  # noqa: F401
from utils.arguments import ArgumentParser
from utils.caption_qa import (FLAGS, TOKEN_PATTERN, Checker, SourceStats, print_table,
                              trim_to_sentence, truncated_flags, write_report)
from utils.hash_buckets import BucketSizing, bucket_of, bucket_path, open_buckets, read_columns
from utils.errors import InputError
from utils.input_reader import expand_inputs, iter_samples
from utils.records import (RecordError, composed_file, index_format, iter_json_lines,
                           iter_json_object)
from utils.webdataset_output import RANDOM_TEXT, OutputFolderInUse, ShardOptions, WebdatasetOutput

# A worker holds one bucket of every index, about 3 times the input bytes per bucket in memory; each
# bucket is an open file during passes 1, 2 and 4.
BUCKETS = BucketSizing(bytes_per_bucket=32 << 20, max_buckets=4000)

encode = json.encoder.encode_basestring
ROW = '{{"image": {}, "caption": [{}], "truncated": [{}], "sources": [{}]{}}}\n'
FLAG_JSON = {True: "true", False: "false", None: "null"}
ORIGINAL_SOURCE = "original"
SOURCE_NAME = re.compile(r"[a-z0-9_-]+")  # a name webdataset keeps as it is in KEY.<name>.txt (it lower-cases)
# Fields of a joined row; an original's metadata field of the same name is kept as input_<name> (or left out where
# it says what the row says: img2dataset's "key", and "caption" when it is the original caption).
ROW_FIELDS = ("image", "caption", "truncated", "sources", "key")


def iter_index(path):
    """Yield (image, caption, truncated or None) from a composed_index.json or a composed.jsonl."""
    if index_format(path) == "object":
        for number, (image, caption) in enumerate(iter_json_object(path)):
            if not isinstance(caption, str):
                raise RecordError(f"{path}: member {number} ({image}): the caption is not a string")
            yield image, caption, None
        return
    for number, record in iter_json_lines(path, allow_partial_last=True):
        try:
            image, caption, truncated = record["image"], record["caption"], record.get("truncated")
            if type(image) is not str or type(caption) is not str:
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise RecordError(f"{path}:{number}: expected {{\"image\": string, \"caption\": string}}") from None
        yield image, caption, truncated if type(truncated) is bool else None


def valid_source(name):
    return isinstance(name, str) and SOURCE_NAME.fullmatch(name) is not None


def index_names(paths, given, taken):
    """The source name of each index: --names, else its prompt folder (outputs/qwen/ckpt/detail/composed.jsonl:
    detail) or its file name, lower-cased with other characters as "-"; where two would be the same, with the
    checkpoint folder in front, then numbered. `taken`: the original's names. Raises InputError for given names
    that cannot be member names or repeat."""
    if given is not None:
        names = given.split(",")
        if len(names) != len(paths):
            raise InputError(f"--names gives {len(names)} names for {len(paths)} --index")
        bad = [name for name in names if not valid_source(name)]
        if bad:
            raise InputError(f"--names: {bad[0]!r} is not a source name (lower-case letters, digits, _ and -)")
        if len(set(names)) < len(names) or set(names) & set(taken):
            raise InputError(f"--names: {', '.join(names)} repeat, or repeat the original's {', '.join(taken)}")
        return names

    def cleaned(text):
        return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "index"

    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    names = [cleaned(os.path.basename(folder) if re.fullmatch(r"(.*_)?composed(_index)?\.jsonl?", os.path.basename(p))
                     else os.path.splitext(os.path.basename(p))[0]) for p, folder in zip(paths, folders)]
    if len(set(names)) < len(names) or set(names) & set(taken):
        names = [cleaned(f"{os.path.basename(os.path.dirname(folder))}-{name}") for folder, name in zip(folders, names)]
    unique = []
    for name in names:
        candidate, number = name, 1
        while candidate in unique or candidate in taken:
            number += 1
            candidate = f"{name}-{number}"
        unique.append(candidate)
    return unique


def first_sources(original):
    """The source names of the original's first row (an earlier merge's output has several)."""
    if original.kind == "json":
        for _, _, _, sources, _ in iter_original_lines(original.files[0]):
            return sources
    return [ORIGINAL_SOURCE]


def original_sources(count):
    return [ORIGINAL_SOURCE] + [f"{ORIGINAL_SOURCE}_{n}" for n in range(1, count)]


def iter_original(inputs, image_root):
    """Yield (image, [captions], [truncated flags], [source names], {key and metadata}) from the original: JSONL,
    or the samples of tar shards or Parquet files with their original caption ("" where a sample has none) under
    the ids captioning gave them, their key, and their .json member's fields or scalar columns."""
    if inputs.kind == "json":
        yield from iter_original_lines(inputs.files[0])
        return
    for sample in iter_samples(inputs, image_root, originals=True):
        caption = sample.caption or ""
        yield sample.image, [caption], [None], [ORIGINAL_SOURCE], row_extra(sample.key, caption, sample.metadata)


def row_extra(key, caption, metadata):
    """A sample's key and metadata for its row, clashing names kept as input_<name> (see ROW_FIELDS)."""
    extra, ours = {"key": key}, {"key": key, "caption": caption}
    for name, value in metadata.items():
        if name in ROW_FIELDS:
            if ours.get(name) == value:
                continue
            name = f"input_{name}"
        extra[name] = value
    return extra


def iter_original_lines(path):
    """The rows of an original JSONL; a caption may already be a list (e.g. the output of an earlier
    multi-caption merge, whose flags and source names are kept). Its other fields are the row's metadata."""
    for number, record in iter_json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise RecordError(f"{path}:{number}: expected an object with an \"image\" string")
        caption = record.get("caption")
        if isinstance(caption, str):
            caption = [caption]
        elif not (isinstance(caption, list) and all(isinstance(c, str) for c in caption)):
            raise RecordError(f"{path}:{number}: \"caption\" must be a string or a list of strings")
        sources = record.get("sources")
        if not (isinstance(sources, list) and len(sources) == len(caption) and all(map(valid_source, sources))):
            sources = original_sources(len(caption))
        metadata = {k: v for k, v in record.items() if k not in ("image", "caption", "truncated", "sources")}
        yield record["image"], caption, truncated_flags(caption, record.get("truncated")), sources, metadata


def split_original(name, inputs, image_root, work, num_buckets, qa):
    """Pass 1: the original rows into buckets (five lines a row: the image, then the captions, their truncated
    flags and their source names as JSON texts joined by ", ", then the key and metadata as the JSON text of
    members that end the row, each starting with ", "); the bucket of each row, in order, into `order`."""
    stats = SourceStats(name) if qa else None
    order, rows = array("H"), 0
    with open(os.path.join(work, "order"), "wb") as order_out, open_buckets(work, "original", num_buckets) as buckets:
        for image, captions, flags, sources, extra in iter_original(inputs, image_root):
            b = bucket_of(image, num_buckets)
            members = "".join(f", {encode(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in extra.items())
            buckets[b].write(f"{encode(image)}\n{', '.join(map(encode, captions))}\n"
                             f"{', '.join(FLAG_JSON[flag] for flag in flags)}\n{', '.join(map(encode, sources))}\n"
                             f"{members}\n")
            order.append(b)
            if len(order) >= 1 << 20:
                order.tofile(order_out)
                del order[:]
            if qa:
                for caption, flag in zip(captions, flags):
                    stats.add(image, caption, qa.flags(caption, flag))
            rows += 1
        order.tofile(order_out)
    return rows, stats


def split_index(k, path, work, num_buckets, qa, trim_truncated, drop_flags):
    """Pass 2: one index into buckets, three lines an entry: image and caption as JSON strings, the
    truncated flag as JSON. A caption trimmed back to a complete sentence is no longer truncated."""
    stats = SourceStats(path) if qa else None
    counts = {"path": path, "entries": 0, "missing": 0, "trimmed": 0, "dropped_flagged": 0}
    with open_buckets(work, f"index{k}", num_buckets) as buckets:
        for image, caption, truncated in iter_index(path):
            counts["entries"] += 1
            if qa:
                flags = qa.flags(caption, truncated)
                stats.add(image, caption, flags)
                if trim_truncated and "truncated" in flags:
                    trimmed = trim_to_sentence(caption)
                    if trimmed != caption:
                        caption, truncated = trimmed, False
                        counts["trimmed"] += 1
                if drop_flags and any(flag in drop_flags for flag in flags):
                    counts["dropped_flagged"] += 1
                    continue  # treated as missing when joining, as the user asked
            entry = f"{encode(image)}\n{encode(caption)}\n{FLAG_JSON[truncated]}\n"
            buckets[bucket_of(image, num_buckets)].write(entry)
    return counts, stats


def join_bucket(b, work, names, missing):
    """Pass 3: one bucket: each index's captions and flags into dicts (the last entry of an image wins,
    as with json.load), looked up for every original row of the bucket; writes one line per row, "\n"
    for a dropped row. Whole columns at a time (map, zip, str.join), as per-row Python is slow."""
    columns, flag_columns = [], []
    for k in range(len(names)):
        images, captions, flags = read_columns(work, f"index{k}", b, 3)
        columns.append(dict(zip(images, captions)))
        flag_columns.append(dict(zip(images, flags)))
        del images, captions, flags
    images, originals, original_flags, original_names, extras = read_columns(work, "original", b, 5)
    columns = [list(map(index.get, images)) for index in columns]
    flag_columns = [list(map(index.get, images)) for index in flag_columns]
    missed, incomplete = [], set()
    for column, flag_column in zip(columns, flag_columns):
        holes = [i for i, caption in enumerate(column) if caption is None] if None in column else []
        for i in holes:
            column[i] = flag_column[i] = ""  # no JSON value is empty, so the row is recognised below
        missed.append(len(holes))
        incomplete.update(holes)
    index_names = "".join(f", {encode(name)}" for name in names)
    rows = list(map(ROW.format, images, map(", ".join, zip(originals, *columns)),
                    map(", ".join, zip(original_flags, *flag_columns)),
                    [source + index_names for source in original_names], extras))
    for i in incomplete:
        if missing == "drop":
            rows[i] = "\n"
        else:
            present = [(column[i], flag_column[i], encode(name))
                       for column, flag_column, name in zip(columns, flag_columns, names) if column[i]]
            rows[i] = ROW.format(images[i], ", ".join([originals[i], *(c for c, _, _ in present)]),
                                 ", ".join([original_flags[i], *(f for _, f, _ in present)]),
                                 ", ".join([original_names[i], *(n for _, _, n in present)]), extras[i])
    with open(bucket_path(work, "joined", b), "w", encoding="utf-8") as joined:
        joined.writelines(rows)
    return missed


class JsonlOutput:
    """Joined rows into one JSONL file, created when the rows come (a failed merge leaves none)."""

    def __init__(self, path):
        self.path, self.file = path, None

    def write(self, line):
        if self.file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")
        self.file.write(line)

    def close(self):
        if self.file is None:
            self.write("")  # no row: an empty file
        self.file.close()
        return {}


def bucket_bytes(original, indexes):
    """About what the buckets will hold: a JSONL original counts its size; tar shards and Parquet files
    are mostly image bytes, so there the original counts as much as two average indexes (a row per image,
    with its metadata)."""
    index_bytes = sum(os.path.getsize(p) for p in indexes)
    if original.kind == "json":
        return os.path.getsize(original.files[0]) + index_bytes
    return index_bytes + 2 * index_bytes // len(indexes)


def merge(original, image_root, indexes, names, output, missing="drop", qa=None, trim_truncated=False, drop_flags=(),
          tmp_dir=None, num_buckets=None, workers=1):
    """Write the joined rows to `output` (JsonlOutput or WebdatasetOutput); return a summary dict.

    original: the Inputs (utils/input_reader.py) of --original; image_root: the folder its ids start from (as
    in captioning: --image-root, else original.root). qa: a caption_qa.Checker to flag captions and gather
    statistics (trim_truncated and drop_flags need it). names: the source name of each index. workers: processes
    for passes 1 to 3 (the original and each index are split in parallel, then the buckets joined in parallel).
    """
    num_buckets = num_buckets or BUCKETS.count(bucket_bytes(original, indexes))
    # Leaving the block stops the pool, then removes the bucket files.
    with tempfile.TemporaryDirectory(prefix="merge-multi-", dir=tmp_dir, ignore_cleanup_errors=True) as work, \
            (multiprocessing.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
        starmap = pool.starmap if pool else lambda f, jobs: [f(*job) for job in jobs]
        name = original.files[0] if original.kind == "json" else os.path.commonpath(original.files)
        jobs = [(split_original, (name, original, image_root, work, num_buckets, qa))]
        jobs += [(split_index, (k, p, work, num_buckets, qa, trim_truncated, drop_flags))
                 for k, p in enumerate(indexes)]
        split = starmap(call, jobs)
        (rows_in, original_stats), index_results = split[0], split[1:]
        summary = {"rows_in": rows_in, "rows_out": 0, "rows_dropped": 0, "buckets": num_buckets,
                   "indexes": [counts for counts, _ in index_results]}
        for missed in starmap(join_bucket, [(b, work, names, missing) for b in range(num_buckets)]):
            for counts, n in zip(summary["indexes"], missed):
                counts["missing"] += n

        for line in ordered_rows(work, num_buckets, summary):
            output.write(line)
        summary["output"] = output.close()
    if qa:
        summary["qa"] = [original_stats.summary()] + [stats.summary() for _, stats in index_results]
    return summary


def ordered_rows(work, num_buckets, summary):
    """Pass 4: the joined rows back in the original order; dropped rows are counted, not yielded."""
    with open(os.path.join(work, "order"), "rb") as order_in, open_buckets(work, "joined", num_buckets, "r") as joined:
        while True:
            order = array("H")
            try:
                order.fromfile(order_in, 1 << 20)
            except EOFError:
                pass  # the last, shorter chunk was read
            if not order:
                break
            for b in order:
                line = joined[b].readline()
                if line == "\n":
                    summary["rows_dropped"] += 1
                else:
                    summary["rows_out"] += 1
                    yield line


def call(function, args):
    return function(*args)


def parse_arguments(argv):
    parser = ArgumentParser(
        description="Join the original captions with generated ones: writes {\"image\": p, \"caption\": "
                    "[original, c1, ..., cN], \"truncated\": [...], \"sources\": [original, n1, ..., nN], "
                    "...the original's key and metadata} per line (or webdataset shards), in the original's order, "
                    "c1..cN in --index order.")
    parser.add_argument("--original", required=True, metavar="ORIGINAL",
                        help="JSONL with {\"image\", \"caption\"} per line (caption: a string, or a list that is "
                             "extended), or the captioning input when it is webdataset tar shards (a .tar, a folder "
                             "of them, a brace pattern; caption from KEY.txt or KEY.json) or Parquet (a file, a "
                             "folder, a Hub dataset folder or a pattern; a caption or text column)")
    parser.add_argument("--image-root", metavar="DIR",
                        help="the captioning run's --image-root, if it had one: the folder image ids start from "
                             "(default: the original's, as in captioning: its folder, or the folder holding its "
                             "shards or Parquet files); used to name the rows of shards and Parquet files and to "
                             "read images for --output-format webdataset")
    parser.add_argument("--index", action="append", required=True, metavar="FILE",
                        help="generated captions: a composed_index.json ({image: caption}), a composed.jsonl, "
                             "or a folder holding one (utils/merge.py's output). Repeat it; the order is kept")
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="the multi-caption JSONL to write, or the folder of shards for --output-format webdataset")
    parser.add_argument("--output-format", choices=("jsonl", "webdataset"), default="jsonl",
                        help="jsonl (default), or webdataset: tar shards of KEY.<image ext> (the image bytes "
                             "unchanged), KEY.json (the row), KEY.<source>.txt (each caption) and KEY.txt (see "
                             "--txt), with NAME.parquet, NAME_stats.json and sizes.json beside them; the shards "
                             "mirror the original's when it is tar shards")
    parser.add_argument("--names", metavar="A,B,...",
                        help="source names of the indexes, in --index order (lower-case letters, digits, _ and -): "
                             "the row's \"sources\" and the KEY.<source>.txt members. Default: each index's prompt "
                             "folder (detail, noun, ...), or its file name; with the checkpoint folder in front "
                             "where two would be the same")
    parser.add_argument("--txt", default=ORIGINAL_SOURCE, metavar="SOURCE|random",
                        help="with --output-format webdataset: what KEY.txt holds, the one caption that open_clip "
                             "and other one-text loaders train on: "
                             f"a source's caption ({ORIGINAL_SOURCE}, the default, or an index's name), or "
                             f"{RANDOM_TEXT}: one of the sample's captions drawn with --txt-seed (the same draw on "
                             "every run)")
    parser.add_argument("--txt-seed", type=int, default=0, metavar="S", help="seed of --txt random (default 0)")
    parser.add_argument("--image-extension", metavar="EXT",
                        help="with --output-format webdataset: the extension of every image member (the bytes stay "
                             "as they are). Default: a tar "
                             "member's or a file's own; for Parquet rows, the format of the first row's image")
    parser.add_argument("--shard-size", type=int, default=10000, metavar="N",
                        help="samples per output shard for --output-format webdataset when the original is not "
                             "tar shards (default 10000, as img2dataset's)")
    parser.add_argument("--missing", choices=("drop", "keep-shorter"), default="drop",
                        help="an image missing from some index: drop the row (default; every row then has "
                             "1 + N captions in a fixed order, as the original script required), or keep it "
                             "with the captions that exist (the list is shorter; \"sources\" names them)")
    parser.add_argument("--qa-report", metavar="FILE",
                        help="flag captions (" + ", ".join(FLAGS) + "; see utils/caption_qa.py), print "
                             "statistics per source and write them with examples as JSON to FILE")
    parser.add_argument("--trim-truncated", action="store_true",
                        help="cut generated captions flagged truncated back to their last complete sentence "
                             "(one with no complete sentence stays as it is)")
    parser.add_argument("--drop-flagged", metavar="FLAGS",
                        help="comma-separated flags whose generated captions are left out, i.e. treated as "
                             "missing from their index (then --missing decides); nothing is dropped otherwise")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt text whose echo is flagged, besides the model scripts' preset prompts "
                             "(repeatable)")
    parser.add_argument("--tmp-dir", help="folder for the temporary bucket files (at most about the size of all inputs "
                                          "plus the output); default: the system's temporary folder")
    BUCKETS.add_arguments(parser, memory="one bucket of all indexes",
                          workers="processes splitting and joining in parallel; memory grows with it")
    args = parser.parse_args(argv)
    BUCKETS.check_arguments(parser, args)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    if args.image_extension is not None and not SOURCE_NAME.fullmatch(args.image_extension):
        parser.error(f"--image-extension: {args.image_extension!r} is not an extension such as jpg")
    args.drop_flagged = tuple(args.drop_flagged.split(",")) if args.drop_flagged else ()
    unknown = [f for f in args.drop_flagged if f not in FLAGS]
    if unknown:
        parser.error(f"--drop-flagged: unknown flag {', '.join(unknown)} (known: {', '.join(FLAGS)})")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    try:
        original = expand_inputs(args.original)
        image_root = args.image_root or original.root
        indexes = [composed_file(p) for p in args.index]
        names = index_names(indexes, args.names, first_sources(original))
        if args.txt not in (RANDOM_TEXT, ORIGINAL_SOURCE, *names):
            raise InputError(f"--txt {args.txt}: neither {RANDOM_TEXT} nor a source ({ORIGINAL_SOURCE}, "
                             f"{', '.join(names)})")
        options = ShardOptions(args.shard_size, args.txt, args.txt_seed, args.image_extension)
        output = (WebdatasetOutput(args.output, original, image_root, options)
                  if args.output_format == "webdataset" else JsonlOutput(args.output))
        qa = Checker(args.prompt) if args.qa_report or args.trim_truncated or args.drop_flagged else None
        summary = merge(original, image_root, indexes, names, output, args.missing, qa, args.trim_truncated,
                        args.drop_flagged, args.tmp_dir, args.buckets, args.workers)
    except (InputError, RecordError, OutputFolderInUse) as e:
        sys.exit(f"merge_multi_caption.py: error: {e}")
    except OSError as e:
        sys.exit(f"merge_multi_caption.py: error: {e.filename or ''}: {e.strerror}")
    print_summary(summary, args)


def print_summary(summary, args):
    for counts in summary["indexes"]:
        extra = (f", {counts['trimmed']} trimmed" if args.trim_truncated else "") + \
                (f", {counts['dropped_flagged']} left out as flagged" if args.drop_flagged else "")
        print(f"merge_multi_caption.py: index {counts['path']}: {counts['entries']} entries, "
              f"{counts['missing']} original images missing{extra}")
    print(f"merge_multi_caption.py: {summary['rows_in']} original rows, {summary['rows_out']} written, "
          f"{summary['rows_dropped']} dropped (missing captions, --missing {args.missing}) -> {args.output}")
    if args.output_format == "webdataset":
        counts = summary["output"]
        shards = f"{counts['shards']} shard{'s' * (counts['shards'] != 1)}"
        print(f"merge_multi_caption.py: {counts['samples']} samples in {shards}, {counts['unreadable']} left out "
              f"(image unreadable now)")
    if "qa" in summary:
        print_table(summary["qa"])
        if args.qa_report:
            write_report(args.qa_report, summary["qa"], f"regex {TOKEN_PATTERN}")
            print(f"merge_multi_caption.py: QA report written to {args.qa_report}")


if __name__ == "__main__":
    main()
