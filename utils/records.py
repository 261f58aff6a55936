"""Streaming readers for the JSON formats this project meets.

Inputs and outputs can hold tens of millions of rows, so nothing here loads a whole file: a JSON
array (the original scripts' input list and per-rank outputs) is decoded one element at a time, a JSONL
file one line at a time, a composed_index.json ({image: caption}) one member at a time.

Files that a killed writer (or a full disk) left cut off may end inside a UTF-8 character: the readers
decode only what is complete, so such a tail reads as a partial ending, not as a decoding error.
"""
import codecs
import json
import os
import re
from json.decoder import scanstring

_CHUNK = 1 << 20
_WHITESPACE = " \t\r\n"
_BLANK_CHARS = _WHITESPACE + "\ufeff"  # a byte order mark may start a file
_BLANK_RUN = re.compile(f"[{_BLANK_CHARS}]*")
_decoder = json.JSONDecoder()
MARK_EVERY = 4096  # the fewest elements between two marks that iter_json_array leaves for a later start
_RUN_CHARS = 1 << 16  # the most text parsed in one call as a run of whole elements


class RecordError(ValueError):
    """A file that is not in the expected format; the message names the file and the problem."""


def detect_format(path):
    """'array' for a JSON array, 'lines' for JSONL, from the first non-blank character."""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                raise RecordError(f"{path}: the file is empty")
            stripped = chunk.decode("utf-8", "ignore").lstrip(_BLANK_CHARS)
            if stripped:
                break
    if stripped[0] == "[":
        return "array"
    if stripped[0] == "{":
        return "lines"
    raise RecordError(f"{path}: not JSON or JSONL (starts with {stripped[:20]!r})")


class _ArrayText:
    """The text of a JSON array file, decoded a chunk at a time: buf[pos:] is what is not parsed yet, and buf[0] is
    at byte `base` of the file."""

    def __init__(self, f, path, start=0):
        self.f, self.path = f, path
        self.buf, self.pos, self.eof, self.base = "", 0, False, start
        self.failed_cut = -1  # a "}" of buf that whole_elements found inside an element
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        f.seek(start)

    def fill(self):
        chunk = self.f.read(_CHUNK)
        self.eof = not chunk
        try:
            text = self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:
            if not (self.eof and e.reason == "unexpected end of data"):
                raise RecordError(f"{self.path}: not UTF-8 text") from None
            text = ""  # the file ends inside a character: the element it is in is half-written
        self.base = self.offset()
        self.failed_cut -= self.pos
        self.buf = self.buf[self.pos:] + text
        self.pos = 0

    def offset(self):
        """The byte of the file at pos."""
        done = self.buf[:self.pos]
        return self.base + (len(done) if done.isascii() else len(done.encode("utf-8")))

    def next_char(self):
        """The first non-blank character from pos, which moves there; "" at the end of the file."""
        while True:
            self.pos = _BLANK_RUN.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self.fill()

    def whole_elements(self, loads=json.loads):
        """The elements from pos to the last "}" in the next _RUN_CHARS characters, parsed in one C-level call, pos
        moving past them; [] where that "}" is inside an element (in a string or a nested object, where the parse
        fails, since one "]" cannot close what is open there) or the parse fails for any other reason: the caller
        then reads one element at a time, with its exact error."""
        cut = self.buf.rfind("}", self.pos, self.pos + _RUN_CHARS)
        if cut < self.pos or cut <= self.failed_cut:  # no "}" (rfind gives -1), or one found inside an element
            return []
        try:
            elements = loads("[" + self.buf[self.pos:cut + 1] + "]")
        except json.JSONDecodeError:
            self.failed_cut = cut
            return []
        self.pos = cut + 1
        return elements

    def value(self, scan=_decoder.scan_once):
        """The JSON value at pos, which moves past it; json.JSONDecodeError where the file ends first. scan is the
        C scanner behind json.loads, without its Python wrappers."""
        while True:
            try:
                value, self.pos = scan(self.buf, self.pos)
                return value
            except StopIteration as e:
                if self.eof:
                    raise json.JSONDecodeError("Expecting value", self.buf, e.value) from None
                self.fill()
            except json.JSONDecodeError:
                if self.eof:
                    raise
                self.fill()


def iter_json_array(path, allow_truncated=False, on_partial=None, start=None, marks=None):
    """Yield the elements of a JSON array one by one.

    allow_truncated: an unfinished array (the original scripts leave one when killed: no closing
    bracket, a trailing comma, a half-written last element) ends quietly instead of raising.
    on_partial: called with a description when that happens, so callers can report it.
    start: (byte, index) where an element begins, as `marks` gave it: read from there, numbering from index.
    marks: a list that gets (byte, index) of an element at least every MARK_EVERY elements, for a later start.
    """
    def truncated(what):
        if not allow_truncated:
            raise RecordError(f"{path}: the JSON array is cut off ({what})")
        if on_partial:
            on_partial(what)

    with open(path, "rb") as f:
        text = _ArrayText(f, path, start[0] if start else 0)
        if start is None:
            if text.next_char() != "[":
                raise RecordError(f"{path}: expected a JSON array (a list of objects)")
            text.pos += 1
        index = start[1] if start else 0
        marked = None  # the index of the last mark
        while True:
            char = text.next_char()
            if not char:
                return truncated(f"after {index} elements")
            if char == "]":
                return
            if marks is not None and (marked is None or index - marked >= MARK_EVERY):
                marks.append((text.offset(), index))
                marked = index
            elements = text.whole_elements()
            if elements:
                yield from elements
                index += len(elements)
            else:
                try:
                    element = text.value()
                except json.JSONDecodeError as e:
                    if allow_truncated:
                        return truncated(f"half-written element {index}")
                    raise RecordError(f"{path}: not valid JSON at element {index} (cut off?): {e.msg}") from None
                yield element
                index += 1
            char = text.next_char()
            if not char:
                return truncated(f"after {index} elements")
            if char == ",":
                text.pos += 1
            elif char != "]":
                raise RecordError(f"{path}: not valid JSON after element {index - 1}: expected ',' or ']'")


def complete_lines(file):
    """The lines of a file opened in binary mode that end with a newline: a partial tail (a writer killed or
    out of disk space mid-line, maybe inside a UTF-8 character, or one still writing) is never decoded."""
    for line in file:
        if not line.endswith(b"\n"):
            return
        yield line


def _ends_in_partial_line(file):
    """Whether the last line read from a binary file lacked its newline (where complete_lines stopped)."""
    if not file.tell():
        return False
    file.seek(-1, os.SEEK_CUR)
    return file.read(1) != b"\n"


_BLANK_LINE, _PARTIAL_LINE = object(), object()


def _parse_line(path, number, raw, partial_allowed, scan=_decoder.scan_once):
    """One JSONL line (bytes) -> its object, _BLANK_LINE, or _PARTIAL_LINE for a partial last line where allowed.
    scan is the C scanner behind json.loads, without its Python wrappers."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        if partial_allowed:
            return _PARTIAL_LINE
        raise RecordError(f"{path}:{number}: not UTF-8 text") from None
    try:
        record, end = scan(line, 0)
        if end < len(line) and not line[end:].isspace():
            raise StopIteration
    except (StopIteration, json.JSONDecodeError):  # not one JSON value at column 0: json.loads decides
        if not line.strip():
            return _BLANK_LINE
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if partial_allowed:
                return _PARTIAL_LINE
            raise RecordError(f"{path}:{number}: not valid JSON: {e.msg}") from None
    return record


def iter_json_lines(path, allow_partial_last=False, on_partial=None, require_newline=False, byte_range=None):
    """Yield (line number, object) for each non-blank line of a JSONL file.

    allow_partial_last: a last line without its newline that does not decode or parse (a writer
    killed mid-line, maybe inside a UTF-8 character) is skipped instead of raising; on_partial, if
    given, is called with its line number. require_newline: any last line without its newline is
    skipped so, unread (complete_lines), even one that would parse: for files of our writer, which
    ends every line with one, so the rest of the line may be lost.
    byte_range: (low, high): only the lines that start at a byte in [low, high); their numbers count from the
    first of them, but an error names the line of the file.
    """
    with open(path, "rb") as f:
        start, high = (0, None) if byte_range is None else (_seek_line_start(f, byte_range[0]), byte_range[1])
        lines = complete_lines(f) if require_newline else f
        number, line_start = 0, start
        for number, raw in enumerate(lines, 1):
            if high is not None and line_start >= high:
                return
            line_start += len(raw)
            partial_allowed = allow_partial_last and not raw.endswith(b"\n")
            try:
                record = _parse_line(path, number, raw, partial_allowed)
            except RecordError:
                if not start:
                    raise
                # the message names the line of the file: count the lines before the range, now that it matters
                _parse_line(path, number + _lines_before(f, start), raw, partial_allowed)
            if record is _PARTIAL_LINE:
                if on_partial:
                    on_partial(number)
                return
            if record is not _BLANK_LINE:
                yield number, record
        if require_newline and on_partial and _ends_in_partial_line(f):
            on_partial(number + 1)


def _seek_line_start(f, low):
    """Move to the first line that starts at byte `low` or later; its byte."""
    if low > 0:
        f.seek(low - 1)
        f.readline()  # the rest of the line that holds byte low - 1: it starts before low
    return f.tell()


def _lines_before(f, end):
    """The number of lines that end before byte `end` (f's position is lost)."""
    count = 0
    f.seek(0)
    while f.tell() < end:
        count += f.read(min(_CHUNK, end - f.tell())).count(b"\n")
    return count


def iter_records(path, allow_truncated=False):
    """Yield the objects of a JSON array or a JSONL file, whichever the file is."""
    if detect_format(path) == "array":
        yield from iter_json_array(path, allow_truncated=allow_truncated)
    else:
        for _, record in iter_json_lines(path, allow_partial_last=allow_truncated):
            yield record


class _NeedMore(Exception):
    """The buffer ends inside the member being parsed."""


def iter_json_object(path):
    """Yield (key, value) for each member of one JSON object, e.g. a composed_index.json ({image: caption}),
    without holding the whole object in memory."""
    with open(path, encoding="utf-8") as f:
        buf, eof = "", False

        def char_at(i, what):
            """Index of the first non-blank character from i, checked against `what`."""
            i = _BLANK_RUN.match(buf, i).end()
            if i >= len(buf):
                raise _NeedMore
            if buf[i] not in what:
                expected = " or ".join(map(repr, what))
                raise RecordError(f"{path}: not valid JSON after {count} members: expected {expected}")
            return i

        def parse_member(pos):
            """-> (key, value, position after the ',' or '}', that character)."""
            i = char_at(pos, '"')
            key, i = scanstring(buf, i + 1)
            i = char_at(i, ":") + 1
            i = _BLANK_RUN.match(buf, i).end()
            if buf[i:i + 1] == '"':
                value, i = scanstring(buf, i + 1)
            else:
                value, i = _decoder.raw_decode(buf, i)
            i = char_at(i, ",}")
            if i + 1 >= len(buf) and not eof and buf[i] == ",":
                raise _NeedMore  # keep the next member's start in the buffer
            return key, value, i + 1, buf[i]

        count, pos, opened = 0, 0, False
        while True:
            try:
                if not opened:
                    i = _BLANK_RUN.match(buf, pos).end()
                    if i >= len(buf):
                        raise _NeedMore
                    if buf[i] != "{":
                        raise RecordError(f"{path}: expected a JSON object ({{image: caption}})")
                    pos, opened = i + 1, True
                if count == 0 and buf[char_at(pos, '"}')] == "}":
                    pos = char_at(pos, "}") + 1
                    break
                key, value, pos, closer = parse_member(pos)
            except (_NeedMore, json.JSONDecodeError, IndexError) as e:
                if eof:
                    if not opened:
                        raise RecordError(f"{path}: the file is empty") from None
                    what = e.msg if isinstance(e, json.JSONDecodeError) else "cut off"
                    raise RecordError(f"{path}: not valid JSON in member {count}: {what}") from None
                chunk = f.read(_CHUNK)
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
                continue
            yield key, value
            count += 1
            if closer == "}":
                break
        if buf[pos:].strip(_WHITESPACE) or f.read(1 << 16).strip(_WHITESPACE):
            raise RecordError(f"{path}: unexpected text after the JSON object")


def index_format(path):
    """'lines' for JSONL ({"image", "caption"} per line), 'object' for one {image: caption} object.

    Both start with '{'; a JSONL record's first key is "image" or "caption", an index's is a path.
    """
    if path.endswith(".jsonl"):
        return "lines"
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip(_BLANK_CHARS)
    if not head.startswith("{"):
        raise RecordError(f"{path}: expected a composed_index.json object or {{\"image\", \"caption\"}} lines")
    rest = head[1:].lstrip(_WHITESPACE)
    if rest.startswith('"'):
        try:
            key, _ = scanstring(rest, 1)
        except json.JSONDecodeError:
            return "object"
        return "lines" if key in ("image", "caption") else "object"
    return "object"


def composed_file(path):
    """A caption file, or the composed.jsonl (preferred: it keeps the truncated flags) or
    composed_index.json that utils/merge.py wrote in a folder."""
    if os.path.isdir(path):
        for name in ("composed.jsonl", "composed_index.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise RecordError(f"no composed.jsonl or composed_index.json in {path} (run utils/merge.py on it first)")
    if not os.path.isfile(path):
        raise RecordError(f"no such file or folder: {path}")
    return path
