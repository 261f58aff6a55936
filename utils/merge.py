"""Merge the per-rank caption files of one model/prompt into composed.jsonl and composed_index.json.

    python utils/merge.py                          # everything under outputs/, written in place
    python utils/merge.py outputs/qwen/Qwen2-VL-7B-Instruct/default
    python utils/merge.py in_qwenvl_cc12m_*.json --output-dir merged/

Reads our captioning output (captions-RRRRR-of-WWWWW.jsonl; a partial last line of a killed writer,
also one cut inside a UTF-8 character or a complete one that lost its newline, is skipped and counted)
and the original scripts' per-rank JSON arrays (NAME_<rank>.json, also when cut off). Memory stays
bounded whatever the row count: rows are streamed to the outputs in the order they are read, and
duplicates are found by partitioning the image paths into hash buckets on disk (utils/hash_buckets.py)
and checking one bucket at a time.
"""
import json
import multiprocessing
import os
import re
import sys
import tempfile
from collections import defaultdict

if not __package__:  # python utils/merge.py: makes utils importable (utils/as_package.py)
    import as_package  # noqa: F401
from utils.arguments import ArgumentParser
from utils.hash_buckets import BucketSizing, bucket_of, bucket_path, open_buckets
from utils.records import RecordError, detect_format, iter_json_array, iter_json_lines

OUR_FILE = re.compile(r"captions-\d+-of-\d+\.jsonl$")
ORIGINAL_FILE = re.compile(r"(.+)_\d+\.json$")
# One bucket per 64 MiB of input, so one bucket's set of image paths is a few tens of MiB whatever the
# dataset size; at most 256 bucket files are open at a time.
BUCKETS = BucketSizing(bytes_per_bucket=64 << 20, max_buckets=256)

encode = json.encoder.encode_basestring  # the C string encoder; json.dumps minus its overhead
FLAG_JSON = {True: "true", False: "false"}


class MergeError(Exception):
    """A user mistake: reported as one line, exit status 1."""


def natural_key(path):
    """Sort rank numbers numerically: x_2.json before x_10.json."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def group_key(path):
    """(folder, name prefix): one group per model/prompt folder; the original per-rank arrays of
    several models share the input's folder, so they are told apart by their name prefix."""
    folder, name = os.path.split(os.path.abspath(path))
    match = ORIGINAL_FILE.match(name)
    return folder, match.group(1) if match else ""


def find_caption_files(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, name) for name in files
                  if OUR_FILE.match(name) or ORIGINAL_FILE.match(name)]
    return found


def is_caption_file(path):
    """Our captions files always are. A NAME_<rank>.json is an original per-rank array when it is
    an array whose first element has a caption: the original scripts' input list ([{"image": ...}]) or other
    JSON may sit in the same folder under a similar name."""
    if OUR_FILE.match(os.path.basename(path)) or os.path.getsize(path) == 0:
        return True
    try:
        if detect_format(path) != "array":
            return False
        for element in iter_json_array(path, allow_truncated=True):
            return isinstance(element, dict) and "caption" in element
    except RecordError:
        return False
    return True


def collect_groups(inputs, output_dir):
    """-> list of (files, destination folder, file name prefix)."""
    explicit = bool(inputs)
    if not explicit:
        inputs = [output_dir or "outputs"]
    groups = defaultdict(list)
    origin = {}  # group -> the input folder it was found under (for D/<relative path>)
    for item in inputs:
        if os.path.isdir(item):
            files = [f for f in find_caption_files(item) if is_caption_file(f)]
            if not files:
                raise MergeError(f"no caption files (captions-*.jsonl or NAME_<rank>.json) under {item}")
            base = os.path.abspath(item)
        elif os.path.isfile(item):
            files, base = [item], os.path.dirname(os.path.abspath(item))
        elif not explicit and not output_dir:
            raise MergeError("no outputs/ folder here: name the folder that generate.sh wrote into "
                             "(its --output-dir), e.g. python utils/merge.py --output-dir D")
        else:
            raise MergeError(f"no such file or folder: {item}")
        for path in files:
            key = group_key(path)
            if os.path.abspath(path) not in (os.path.abspath(p) for p in groups[key]):
                groups[key].append(path)
            origin.setdefault(key, base)

    prefixes_per_folder = defaultdict(int)
    for folder, _ in groups:
        prefixes_per_folder[folder] += 1
    plan, destinations = [], {}
    for (folder, prefix), files in sorted(groups.items()):
        if explicit and output_dir:
            relative = os.path.relpath(folder, origin[(folder, prefix)])
            destination = output_dir if len(groups) == 1 else os.path.normpath(os.path.join(output_dir, relative))
        else:
            destination = folder
        # Several models' original arrays in one folder must not overwrite each other's outputs.
        name_prefix = f"{prefix}_" if prefixes_per_folder[folder] > 1 and prefix else ""
        target = os.path.join(os.path.abspath(destination), name_prefix + "composed.jsonl")
        if target in destinations:
            raise MergeError(f"{destinations[target]} and {folder} would both be written to {target}; "
                             "merge them separately")
        destinations[target] = folder
        plan.append((sorted(files, key=natural_key), destination, name_prefix))
    return plan


def iter_rows(path, on_partial):
    """Yield (image, caption, truncated: True, False or None where the file does not say, key or None) from one
    caption file, validating each record."""
    if os.path.getsize(path) == 0:  # a rank that was started but wrote nothing yet
        return
    if detect_format(path) == "array":
        records = ((f"element {i}", record) for i, record in
                   enumerate(iter_json_array(path, allow_truncated=True, on_partial=on_partial)))
    else:
        # our writer ends every line with a newline: a last line without one is partial even when it parses
        records = iter_json_lines(path, allow_partial_last=True, on_partial=on_partial, require_newline=True)
    for where, record in records:
        try:
            image, caption = record["image"], record["caption"]
            if type(image) is not str or type(caption) is not str:
                raise TypeError
        except (KeyError, TypeError):
            where = where if isinstance(where, str) else f"line {where}"
            if not isinstance(record, dict):
                raise RecordError(f"{path}: {where}: expected an object, got {type(record).__name__}") from None
            key = "image" if not isinstance(record.get("image"), str) else "caption"
            raise RecordError(f"{path}: {where}: no \"{key}\" string") from None
        truncated, key = record.get("truncated"), record.get("key")
        yield image, caption, truncated if type(truncated) is bool else None, key if type(key) is str else None


def merge_group(files, destination, name_prefix, num_buckets=None):
    """Write composed.jsonl and composed_index.json for one group; return the summary numbers.

    Pass 1 writes every row to both outputs (as temporary files) and each image path, with its row
    number, to a hash bucket. Pass 2 reads one bucket at a time and marks every row whose image was
    already seen in a bitmap (one bit per row). Without duplicates the temporary files are renamed
    into place; otherwise pass 3 copies them without the marked rows.
    """
    os.makedirs(destination, exist_ok=True)
    jsonl_path = os.path.join(destination, name_prefix + "composed.jsonl")
    index_path = os.path.join(destination, name_prefix + "composed_index.json")
    num_buckets = num_buckets or BUCKETS.count(sum(os.path.getsize(f) for f in files))
    partial = []
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=destination, ignore_cleanup_errors=True) as work:
        rows_path, entries_path = os.path.join(work, "rows.jsonl"), os.path.join(work, "index.json")
        rows = write_rows(files, rows_path, entries_path, work, num_buckets, partial)
        duplicate, duplicates = find_duplicates(work, num_buckets, rows)
        if duplicates:
            rows_path, entries_path = copy_kept(rows_path, entries_path, duplicate)
        else:
            with open(entries_path, "a", encoding="utf-8") as entries_out:
                entries_out.write("}\n" if rows else "{}\n")
        os.replace(rows_path, jsonl_path)
        os.replace(entries_path, index_path)
    return {"rows": rows - duplicates, "duplicates": duplicates, "partial": len(partial),
            "files": len(files), "outputs": (jsonl_path, index_path)}


def write_rows(files, rows_path, entries_path, work, num_buckets, partial):
    """Pass 1: every row to the temporary composed.jsonl and composed_index.json, and its image (as JSON)
    and row number, one line, to the image's bucket; the files with a partial ending onto `partial`.
    -> the number of rows."""
    rows = 0
    with open(rows_path, "w", encoding="utf-8") as rows_out, open(entries_path, "w", encoding="utf-8") as entries_out, \
            open_buckets(work, "bucket", num_buckets) as buckets:
        for path in files:
            for image, caption, truncated, key in iter_rows(path, lambda where, p=path: partial.append(p)):
                image_json, caption_json = encode(image), encode(caption)
                rows_out.write(f'{{"image": {image_json}, "caption": {caption_json}'
                               + ("" if truncated is None else f', "truncated": {FLAG_JSON[truncated]}')
                               + ("" if key is None else f', "key": {encode(key)}') + "}\n")
                # One index member per line (JSON allows newlines between members), so pass 3
                # can filter the index line by line too.
                entries_out.write(f"{',' if rows else '{'}{image_json}: {caption_json}\n")
                buckets[bucket_of(image, num_buckets)].write(f"{image_json}\t{rows}\n")
                rows += 1
    return rows


def find_duplicates(work, num_buckets, rows):
    """Pass 2: -> (bitmap of the rows whose image an earlier row has, their count), a bucket at a time
    (memory: one bucket's set of image paths)."""
    duplicate = bytearray((rows + 7) // 8)
    duplicates = 0
    for b in range(num_buckets):
        seen = set()
        with open(bucket_path(work, "bucket", b), encoding="utf-8") as bucket:
            for line in bucket:
                image_json, row = line.rsplit("\t", 1)
                if image_json in seen:
                    row = int(row)
                    duplicate[row >> 3] |= 1 << (row & 7)
                    duplicates += 1
                else:
                    seen.add(image_json)
    return duplicate, duplicates


def copy_kept(rows_path, entries_path, duplicate):
    """Pass 3: the temporary outputs again without the rows marked in `duplicate`; -> the paths of the copies."""
    with open(rows_path, encoding="utf-8") as rows_in, open(entries_path, encoding="utf-8") as entries_in, \
            open(rows_path + ".kept", "w", encoding="utf-8") as rows_out, \
            open(entries_path + ".kept", "w", encoding="utf-8") as entries_out:
        first = True
        for row, (line, entry) in enumerate(zip(rows_in, entries_in)):
            if duplicate[row >> 3] >> (row & 7) & 1:
                continue
            rows_out.write(line)
            entries_out.write(("{" if first else ",") + entry[1:])
            first = False
        if first:
            entries_out.write("{")
        entries_out.write("}\n")
    return rows_path + ".kept", entries_path + ".kept"


def merge_job(job):
    return merge_group(*job)


def main(argv=None):
    parser = ArgumentParser(
        description="Merge per-rank caption files into composed.jsonl ({image, caption} per line) and "
                    "composed_index.json ({image: caption}). Files are grouped by the folder they sit in "
                    "(one model/prompt folder); the original scripts' NAME_<rank>.json arrays also by NAME. "
                    "The same image twice (e.g. after a resume with another process count): the first "
                    "seen is kept (files in name order, rank numbers numerically), the rest counted.")
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="caption files and/or folders searched recursively for captions-*.jsonl and "
                             "NAME_<rank>.json; none: everything under --output-dir, else under outputs/")
    parser.add_argument("--output-dir", metavar="D",
                        help="with INPUTs: write the outputs here (D/<folder relative to the INPUT folder> when "
                             "there are several groups); without INPUTs: the captioning output folder to merge "
                             "in place. Default: next to the caption files")
    BUCKETS.add_arguments(parser, memory="one bucket's image paths",
                          workers="groups merged in parallel")
    args = parser.parse_args(argv)
    BUCKETS.check_arguments(parser, args)
    pool = None
    try:
        plan = collect_groups(args.inputs, args.output_dir)
        jobs = [(files, destination, name_prefix, args.buckets) for files, destination, name_prefix in plan]
        if args.workers > 1 and len(jobs) > 1:
            pool = multiprocessing.get_context("fork").Pool(min(args.workers, len(jobs)))
            results = pool.imap(merge_job, jobs)  # summaries printed in order as groups finish
        else:
            results = map(merge_job, jobs)
        for (files, _, _), result in zip(plan, results):
            print_summary(files, result)
    except (MergeError, RecordError) as e:
        sys.exit(f"merge.py: error: {e}")
    except OSError as e:
        sys.exit(f"merge.py: error: {e.filename or ''}: {e.strerror}")
    finally:
        if pool:  # let the other groups finish and clean up their temporary files
            pool.close()
            pool.join()


def print_summary(files, result):
    print(f"merge.py: {os.path.dirname(os.path.abspath(files[0]))}: {result['rows']} rows from {result['files']} "
          f"file{'s' if result['files'] != 1 else ''}, {result['duplicates']} duplicates dropped (first kept), "
          f"{result['partial']} partial endings skipped -> {result['outputs'][0]}, {result['outputs'][1]}")


if __name__ == "__main__":
    main()
