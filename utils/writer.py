"""This rank's output files: the lines earlier runs wrote, read back to skip what is done, and the lines of each
batch, appended whole."""
import json
import os

from utils.errors import UserError


def complete_lines(file):
    """The lines of a file opened in binary mode that end with a newline: a partial tail (a writer killed or
    out of disk space mid-line, maybe inside a UTF-8 character, or one still writing) is never decoded."""
    for line in file:
        if not line.endswith(b"\n"):
            return
        yield line


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


def open_for_append(path):
    """Open this rank's JSONL file for appending, first cutting off a partial last line left by a killed run
    (what recorded_images did not count)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        cut_partial_tail(path)
    return open(path, "a", encoding="utf-8")


def write_lines(file, rows):
    for row in rows:
        file.write(json.dumps(row, ensure_ascii=False) + "\n")
    file.flush()
    os.fsync(file.fileno())


class ShardWriter:
    """This rank's caption and error files: whole lines, flushed and fsync'd per batch (write). A failed write
    (a full disk) ends the run with one line; what was written before stays, and the next run resumes there."""

    def __init__(self, work, model_name):
        self.work, self.model_name = work, model_name
        self.outputs, self.errors = {}, None
        try:
            self.outputs = {key: open_for_append(path) for key, path in work.caption_files.items()}
            self.errors = open_for_append(work.error_file)
        except OSError as error:
            self.close()
            raise UserError(f"cannot write {error.filename}: {error.strerror or error}") from None

    @staticmethod
    def write(file, rows):
        try:
            write_lines(file, rows)
        except OSError as error:
            raise UserError(f"cannot write {file.name}: {error.strerror or error}; the lines written before are "
                            "kept: make room and run the same command again to resume") from None

    def write_errors(self, indexed_errors):
        self.write(self.errors, [{"image": self.work.pending[index][0], "error": error}
                                 for index, error in indexed_errors])

    def write_captions(self, indexes, wanted, results):
        """results[i][j]: the Caption of image pending[indexes[i]] for prompt key wanted[j]."""
        for j, key in enumerate(wanted):
            rows = []
            for index, per_prompt in zip(indexes, results):
                image, extra, missing = self.work.pending[index]
                if key in missing:
                    rows.append({"image": image, "caption": per_prompt[j].text, "model": self.model_name,
                                 "prompt": key, "truncated": per_prompt[j].truncated, **(extra or {})})
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
            raise UserError(f"--output-dir {settings.model_dir.parent.parent}: cannot write in {folder}: "
                            f"{error.strerror or error}") from None
