"""The writer: this process's caption and error files, locked, appended with whole lines per batch.

Each file is locked (flock) before it is read back or written, so that two processes never append to one file: an
array task started twice, a launch run twice by mistake, a requeued task whose old copy still runs. The lock dies
with its process, so a lock left by a killed process never blocks.
"""
import fcntl
import json
import os

from utils.errors import UserError


def cut_partial_tail(path, chunk=1 << 16):
    """Truncate a file after its last newline, reading only its end (the file may be gigabytes)."""
    with open(path, "rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        while end:
            start = max(0, end - chunk)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            f.truncate(end)


def lock_holder(path):
    """Who holds the flock on `path`, where this host's /proc/locks tells it: "process N on this host", else
    "another process" (one on another host of a shared file system, or a system without /proc/locks)."""
    stat = os.stat(path)
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and inode in fields:
                    return f"process {fields[fields.index(inode) - 1]} on this host"
    except OSError:
        pass
    return "another process"


def open_locked(path, truncate):
    """Open one of this process's JSONL files for appending, holding its lock; then cut off a partial last line
    left by a killed run (truncate: empty it, for --overwrite)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a", encoding="utf-8")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise UserError(f"{path} is being written by {lock_holder(path)}: the same part of this run is running "
                        "already; let it finish (or stop it) before starting it again") from None
    except OSError as error:
        file.close()
        raise UserError(f"{path}: cannot lock it ({error.strerror or error}): the file system does not support "
                        "flock (Lustre: mount with -o flock); see docs/cluster.md") from None
    if truncate:
        file.truncate(0)
    else:
        cut_partial_tail(path)
    return file


def write_lines(file, rows):
    for row in rows:
        file.write(json.dumps(row, ensure_ascii=False) + "\n")
    file.flush()
    os.fsync(file.fileno())


class ShardWriter:
    """This process's caption and error files, each locked while it runs: whole lines, flushed and fsync'd per batch.
    A failed write (a full disk) ends the run with one line; what was written before stays, and the next run resumes
    there."""

    def __init__(self, caption_files, error_file, model_name, truncate=False):
        self.model_name = model_name
        self.outputs, self.errors = {}, None
        try:
            for key, path in caption_files.items():
                self.outputs[key] = open_locked(path, truncate)
            self.errors = open_locked(error_file, truncate)
        except (OSError, UserError) as error:
            self.close()
            if isinstance(error, UserError):
                raise
            raise UserError(f"cannot write {error.filename}: {error.strerror or error}") from None

    @staticmethod
    def write(file, rows):
        try:
            write_lines(file, rows)
        except OSError as error:
            raise UserError(f"cannot write {file.name}: {error.strerror or error}; the lines written before are "
                            "kept: make room and run the same command again to resume") from None

    def write_errors(self, entries_and_errors):
        """entries_and_errors: [((image, extra keys, missing prompt keys), reason)]."""
        self.write(self.errors, [{"image": entry[0], "error": error} for entry, error in entries_and_errors])

    def write_captions(self, entries, wanted, results):
        """results[i][j]: the Caption of entries[i] (image, extra keys, missing prompt keys) for prompt key
        wanted[j]."""
        for j, key in enumerate(wanted):
            rows = [{"image": image, "caption": per_prompt[j].text, "model": self.model_name, "prompt": key,
                     "truncated": per_prompt[j].truncated, **(extra or {})}
                    for (image, extra, missing), per_prompt in zip(entries, results) if key in missing]
            self.write(self.outputs[key], rows)

    def close(self):
        for file in (*self.outputs.values(), self.errors):
            try:
                file and file.close()
            except OSError:
                pass  # only a failed write leaves data to flush, and it was reported; the next run cuts the rest


def check_output_folders(settings):
    """Before anything loads (and once the input is known to be good): every output folder can be created and
    written."""
    for folder in [settings.model_dir, *(settings.model_dir / key for key in settings.prompts)]:
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"\n")
            probe.unlink()
        except OSError as error:
            raise UserError(f"--output-dir {settings.output_dir}: cannot write in {folder}: "
                            f"{error.strerror or error}") from None
