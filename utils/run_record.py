"""The run record (run.json): what made the files of an output folder, so that a resume never passes off
captions of another checkpoint or other settings as its own.

    <output-dir>/<model>/<checkpoint>/<prompt>/run.json   the checkpoint's identity (utils/checkpoints.py), the
                                                          prompt text and every setting that changes captions
    <output-dir>/<model>/<checkpoint>/run.json            for the errors-*.jsonl there, which every prompt shares:
                                                          the checkpoint and the model's own flags (what decides
                                                          whether an image can be preprocessed)

Before the model loads, every process compares its record with each folder's. A difference, or outputs without
a record (written before records existed), stops the run with one line. A folder without outputs gets the
record; --overwrite replaces it once the earlier outputs are gone. Records are written atomically: a process
creates the file only where none is (hard link of a finished temporary file), so processes that start together
never overwrite each other; a slower one compares instead.
"""
import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple

from utils.checkpoints import identify_checkpoint, hash_contents
from utils.errors import UserError

RECORD = "run.json"
# The loop's flags that change captions (dtype as resolved for the device). Batch size, workers, sort window,
# attention kernel, CUDA graphs and the compiled prefill change only the speed: in float32 greedy captions stay
# the same (the tests compare them); in bfloat16 they change the last bits of sums, as README says.
CAPTION_SETTINGS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "num_beams", "seed", "dtype")


class OutputFolder(NamedTuple):
    path: Path
    files: str  # glob of the outputs its record covers
    what: str  # what they are, for messages
    prompt: str  # the prompt text; None for the checkpoint folder


def output_folders(model_dir, prompts):
    """Each prompt's folder (its captions; its record, the fullest, is compared first), then the checkpoint
    folder (its error records)."""
    return [*(OutputFolder(model_dir / key, "captions-*.jsonl", "captions", text) for key, text in prompts.items()),
            OutputFolder(model_dir, "errors-*.jsonl", "error records", None)]


def has_outputs(folder):
    """Whether a folder holds outputs of an earlier run (an empty file is a process that wrote nothing yet)."""
    return any(path.is_file() and path.stat().st_size for path in folder.path.glob(folder.files))


def is_used(folder):
    return (folder.path / RECORD).exists() or has_outputs(folder)


def flag_value(value):
    """A model flag as recorded: a file or folder by the identity of its contents, anything else as given."""
    if isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
        return hash_contents(os.path.expanduser(value))
    return value


class RunSettings(NamedTuple):
    checkpoint: dict  # {"model": as given, "identity": its contents}
    model_flags: dict  # the captioner's caption_flags
    settings: dict  # CAPTION_SETTINGS and the model flags


def run_settings(captioner_cls, settings, dtype):
    """This run's side of the comparison; dtype as resolved for the device (a name, not "auto")."""
    identity = identify_checkpoint(settings.model, captioner_cls.model_on_hub)
    model_flags = {dest: flag_value(settings.options[dest]) for dest in captioner_cls.caption_flags}
    decoding = dataclasses.asdict(settings.decoding)
    caption_settings = {**decoding, "seed": settings.seed, "dtype": dtype}
    return RunSettings({"model": settings.model, "identity": identity}, model_flags,
                       {**{name: caption_settings[name] for name in CAPTION_SETTINGS}, **model_flags})


def record_of(folder, run):
    if folder.prompt is None:
        return {"checkpoint": run.checkpoint, "settings": run.model_flags}
    return {"checkpoint": run.checkpoint, "prompt": folder.prompt, "settings": run.settings}


def read_record(path):
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as error:
        raise UserError(f"{path}: not a run record ({error}); remove it, or use --overwrite") from None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoint"), dict):
        raise UserError(f"{path}: not a run record; remove it, or use --overwrite")
    return record


def flag(name):
    return "--" + name.replace("_", "-")


def differences(recorded, current):
    """'FIELD: then ..., now ...' for each field that differs; the checkpoint by its contents, not its spelling."""
    found = []
    then, now = recorded["checkpoint"], current["checkpoint"]
    if then.get("identity") != now["identity"]:
        found.append(f"--model {then.get('model')} then, {now['model']} now" if then.get("model") != now["model"]
                     else f"--model {now['model']}: its files changed")
    if recorded.get("prompt") != current.get("prompt"):
        found.append(f"prompt {recorded.get('prompt')!r} then, {current.get('prompt')!r} now")
    old, new = recorded.get("settings") or {}, current["settings"]
    for name in [*new, *(name for name in old if name not in new)]:
        if old.get(name) != new.get(name):
            found.append(f"{flag(name)} {old.get(name)} then, {new.get(name)} now")
    return found


def check_records(folders, run):
    """Compare each folder's record with this run's; only reads."""
    for folder in folders:
        recorded = read_record(folder.path / RECORD)
        if recorded is None:
            if has_outputs(folder):
                raise UserError(f"{folder.path} holds {folder.what} without a run record ({RECORD}, written since "
                                "this version), so they cannot be checked against these settings: give another "
                                "--output-dir, or --overwrite to replace them")
            continue
        found = differences(recorded, record_of(folder, run))
        if found:
            raise UserError(f"{folder.path} holds {folder.what} made with other settings ({'; '.join(found)}): "
                            "rerun with those to resume, or give another --output-dir, or --overwrite to replace them")


def publish(path, record, replace):
    """Write a record atomically: replace it (--overwrite), or create it only where none is."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    except FileExistsError:
        pass  # another process of this run was first: its record is compared below
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)


def settle_records(folders, run, overwrite):
    """Give each unused folder this run's record (--overwrite: every folder, its earlier outputs already
    removed), then compare them all."""
    for folder in folders:
        if overwrite or not is_used(folder):
            publish(folder.path / RECORD, record_of(folder, run), replace=overwrite)
    check_records(folders, run)
