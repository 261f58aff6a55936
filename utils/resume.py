"""Resume planning: what earlier runs left in the output folders, and so the work left for this process.

An image counts as done for a prompt when a complete line of any captions-*.jsonl in that prompt's folder names it,
whatever the number of processes that wrote it; an image recorded as unreadable in the checkpoint folder's
errors-*.jsonl is skipped too (unless --retry-errors), except one that ran out of memory even alone.
"""
import io
import json
import re
from pathlib import Path
from typing import NamedTuple

from utils.batch_runner import OUT_OF_MEMORY
from utils.input_reader import in_bulk
from utils.run_record import output_folders, run_settings, settle_records
from utils.records import complete_lines


class Work(NamedTuple):
    """What one process has to do: its images not yet done."""
    pending: list  # [(image, extra keys or None, [prompt keys still missing])], in input order
    skipped: int  # images of this part already done or recorded as failed
    input_summary: str  # what the whole input holds, e.g. "30 images" or "12 tar shards, 3.1 GB"
    image_root: str  # the folder that the pending image ids are relative to


class OutputFiles(NamedTuple):
    """This process's files: they hold the lines of its part, and of no other process."""
    captions: dict  # prompt key -> captions file
    errors: Path


def output_files(settings):
    suffix = file_suffix(settings.place)
    return OutputFiles({key: settings.model_dir / key / f"captions-{suffix}" for key in settings.prompts},
                       settings.model_dir / f"errors-{suffix}")


# A line as the writer writes it, with an image id that needs no unescaping: read by a regular expression at C speed
# rather than decoded line by line.
WRITTEN_LINE = re.compile(rb'^\{"image": "([^"\\\n]*)"[^\n]*\}$', re.MULTILINE)
CHUNK = 16 << 20


def complete_chunks(file):
    """The file's bytes in chunks that end with a newline; a partial tail (utils/records.py's complete_lines) is
    left out."""
    rest = b""
    while chunk := file.read(CHUNK):
        chunk, rest = rest + chunk, b""
        end = chunk.rfind(b"\n") + 1
        chunk, rest = chunk[:end], chunk[end:]
        if chunk:
            yield chunk


def images_of_lines(chunk):
    """The "image" of each JSON line of a chunk, skipping lines that are not one of ours."""
    images = WRITTEN_LINE.findall(chunk)
    if len(images) == chunk.count(b"\n"):
        return [image.decode("utf-8", "replace") for image in images]
    images = []
    for line in complete_lines(io.BytesIO(chunk)):
        try:
            images.append(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            continue
    return images


def captioned_images(folder, keep):
    """Image ids in `keep` that a complete line of a captions-*.jsonl in `folder` names (any world size)."""
    found = set()
    for file in sorted(Path(folder).glob("captions-*.jsonl")):
        if file.is_file():
            with open(file, "rb") as f:
                for chunk in complete_chunks(f):
                    found.update(image for image in images_of_lines(chunk) if image in keep)
    return found


def failed_images(folder, keep):
    """Image ids in `keep` that an errors-*.jsonl in `folder` records as unreadable, except those that ran out of
    memory even alone (not the image's fault: tried again)."""
    found = set()
    for file in sorted(Path(folder).glob("errors-*.jsonl")):
        if not file.is_file():
            continue
        with open(file, "rb") as f:
            for line in complete_lines(f):
                try:
                    row = json.loads(line)
                    image = row["image"]
                except (ValueError, KeyError, TypeError):
                    continue  # not one of ours
                if image in keep and row.get("error") != OUT_OF_MEMORY:
                    found.add(image)
    return found


def file_suffix(place):
    return f"{place.rank:05d}-of-{place.world:05d}.jsonl"


def remove_earlier_outputs(settings):
    """--overwrite: rank 0 removes the files of other world sizes (each process empties its own, which it holds
    locked: utils/writer.py). No process reads them."""
    place, model_dir = settings.place, settings.model_dir
    if place.rank != 0:
        return
    for old in [*model_dir.glob("errors-*.jsonl"),
                *(f for key in settings.prompts for f in (model_dir / key).glob("captions-*.jsonl"))]:
        if not old.name.endswith(f"-of-{place.world:05d}.jsonl"):
            old.unlink(missing_ok=True)


def settle_outputs(captioner_cls, settings, dtype):
    """The run records, before the model loads (dtype: as resolved for the device): with --overwrite the earlier
    outputs go first, then the records are replaced; otherwise every folder's record must match this run's."""
    if settings.overwrite:
        remove_earlier_outputs(settings)
    settle_records(output_folders(settings.model_dir, settings.prompts), run_settings(captioner_cls, settings, dtype),
                   settings.overwrite)


@in_bulk
def plan_work(settings, part):
    """This process's part of the input (input_reader.read_part's answer) less what earlier runs did."""
    model_dir, prompts = settings.model_dir, settings.prompts
    part, input_summary, image_root = part
    part_images = {image for image, _ in part}
    if settings.overwrite:  # settle_outputs removes the earlier outputs: none is read
        done, failed = {key: set() for key in prompts}, set()
    else:
        done = {key: captioned_images(model_dir / key, part_images) for key in prompts}
        failed = set() if settings.retry_errors else failed_images(model_dir, part_images)
    pending, seen = [], set()
    for image, extra in part:
        missing = [key for key in prompts if image not in done[key]]
        if missing and image not in failed and image not in seen:
            pending.append((image, extra, missing))
        seen.add(image)
    return Work(pending, len(part) - len(pending), input_summary, image_root)
