"""Caption quality flags and summary statistics per caption source.

    python utils/caption_qa.py outputs/qwen/Qwen2-VL-7B-Instruct/default --report qa.json
    python utils/caption_qa.py merged.jsonl --names original,detail,noun,background,main,style
    python utils/caption_qa.py cc3m-multi/          # webdataset shards of merge_multi_caption.py

Flags (a caption can have several; flags only report, they never remove anything):
  empty       nothing but whitespace
  truncated   generation stopped at the token limit: the record's "truncated" field when it has one (in a
              multi-caption row, its entry for the caption's position); otherwise the text ends without
              . ! ? (or a closing quote/bracket after one) although it already holds a complete sentence or
              is at least TRUNCATED_MIN_WORDS words long (short noun lists and web alt-texts without a final
              full stop are not flagged)
  repetition  a looping model: some word 4-gram repeats so that at least REPEATED_FRACTION of the
              caption's 4-grams are repeats, or one word or phrase comes three times in a row
  refusal     "I'm sorry", "I cannot", "As an AI", ...
  prompt_echo the caption contains one of the prompts (the model scripts' presets, utils/prompts.py, and
              --prompt texts) or chat-template markers (USER:, ASSISTANT:, ###, <|im_start|>, <image>)

Token counts use the regex \\w+|[^\\w\\s] (words and single punctuation marks) unless --tokenizer
names a Hugging Face tokenizer; word counts split on whitespace.
"""
import functools
import json
import os
import re
import sys
from collections import Counter

if not __package__:  # python utils/caption_qa.py: makes utils importable (utils/as_package.py)
    import as_package  # noqa: F401
from utils.arguments import ArgumentParser
from utils.merge import OUR_FILE
from utils.prompts import ALL as PRESET_PROMPTS  # a caption containing one echoes its prompt
from utils.records import (RecordError, detect_format, index_format, iter_json_lines,
                           iter_json_object, iter_records)
from utils.tar_shards import holds_shards
from utils.webdataset_output import iter_shard_records

FLAGS = ("empty", "truncated", "repetition", "refusal", "prompt_echo")
TRUNCATED_MIN_WORDS = 40
REPEATED_FRACTION = 0.3
TOKEN_PATTERN = r"\w+|[^\w\s]"

SENTENCE_END = re.compile(r"""[.!?。！？…]["'”’)\]]*$""")
INNER_SENTENCE_END = re.compile(r"""[.!?。！？…]["'”’)\]]*(?=\s)""")
REFUSAL = re.compile(
    r"\b(?:I[’']?m sorry|I am sorry|I apologi[sz]e|sorry, (?:but )?I|I can(?:not|[’']t)|I[’']?m (?:not able|unable)"
    r"|I am (?:not able|unable)|as an AI\b|as a language model|unable to (?:see|view|describe|determine|provide|help)"
    r"|(?:can(?:not|[’']t)|not able to) (?:see|view|describe|determine|provide) (?:the|this|any|an?) ?image)",
    re.IGNORECASE)
REFUSAL_HINTS = ("sorry", "apolog", "cannot", "can't", "can’t", "unable", "not able", " ai", "language model")
TEMPLATE_MARKERS = re.compile(r"\b(?:USER|ASSISTANT|Human|Assistant):|###|<\|im_(?:start|end)\|>|<image>|</?img>")
CONSECUTIVE_REPEAT = re.compile(r"\b(\w+(?:\s+\w+){0,5})(?:[\s,.;]+\1\b){2}", re.IGNORECASE)
NON_WORD = re.compile(r"[^\w]+")
TOKEN = re.compile(TOKEN_PATTERN)


def count_regex_tokens(text):
    return len(TOKEN.findall(text))


def normalize(text):
    return " ".join(NON_WORD.sub(" ", text.lower()).split())


class Checker:
    """Computes the flags of one caption; holds the normalised prompt texts."""

    def __init__(self, prompts=()):
        self.prompts = [p for p in (normalize(t.replace("<image>", " ")) for t in (*PRESET_PROMPTS, *prompts)) if p]
        # A caption can only contain a prompt if it contains the prompt's first word.
        self.prompt_hints = {p.split()[0] for p in self.prompts}

    def flags(self, text, truncated=None):
        lowered = text.lower()
        words = lowered.split()
        if not words:
            return ("empty",)
        found = []
        if truncated is True or (truncated is None and not SENTENCE_END.search(text.rstrip()[-8:])
                                 and (len(words) >= TRUNCATED_MIN_WORDS or INNER_SENTENCE_END.search(text))):
            found.append("truncated")
        if self._repeats(words, text):
            found.append("repetition")
        # Substring tests first: the regexes cost more than everything else together.
        if any(hint in lowered for hint in REFUSAL_HINTS) and REFUSAL.search(text):
            found.append("refusal")
        if (("#" in text or "<" in text or ":" in text) and TEMPLATE_MARKERS.search(text)) \
                or (any(h in lowered for h in self.prompt_hints) and self._echoes(text)):
            found.append("prompt_echo")
        return tuple(found)

    @staticmethod
    def _repeats(lowered, text):
        grams = len(lowered) - 3
        repeated = grams - len(set(zip(lowered, lowered[1:], lowered[2:], lowered[3:]))) if grams > 0 else 0
        if grams >= 8 and repeated >= REPEATED_FRACTION * grams:
            return True
        # A phrase of 2 to 6 words said three times in a row repeats a 4-gram, one word said three
        # times has equal neighbours; only then is the (slower) regex worth running.
        if repeated or any(map(str.__eq__, lowered, lowered[1:])):
            return CONSECUTIVE_REPEAT.search(text) is not None
        return False

    def _echoes(self, text):
        caption = normalize(text)
        return any(prompt in caption for prompt in self.prompts)


def trim_to_sentence(text):
    """The text up to its last complete sentence; unchanged when it has none."""
    if SENTENCE_END.search(text.rstrip()):
        return text.rstrip()
    ends = list(INNER_SENTENCE_END.finditer(text))
    return text[:ends[-1].end()] if ends else text


class SourceStats:
    """Counts, length histograms, flag counts and a few examples per flag for one caption source."""

    def __init__(self, name, examples=3, count_tokens=None):
        self.name = name
        self.examples = examples
        self.count_tokens = count_tokens or count_regex_tokens  # a module function: stats cross processes
        self.count = 0
        self.words = Counter()
        self.tokens = Counter()
        self.flags = Counter()
        self.flag_examples = {flag: [] for flag in FLAGS}

    def add(self, image, text, flags):
        self.count += 1
        self.words[len(text.split())] += 1
        self.tokens[self.count_tokens(text)] += 1
        for flag in flags:
            self.flags[flag] += 1
            if len(self.flag_examples[flag]) < self.examples:
                self.flag_examples[flag].append({"image": image, "caption": text})

    def summary(self):
        return {"source": self.name, "count": self.count,
                "words": distribution(self.words), "tokens": distribution(self.tokens),
                "flags": {flag: self.flags[flag] for flag in FLAGS},
                "flag_rates": {flag: self.flags[flag] / self.count if self.count else 0.0 for flag in FLAGS},
                "examples": {flag: e for flag, e in self.flag_examples.items() if e},
                "word_histogram": {str(k): v for k, v in sorted(self.words.items())}}


def distribution(histogram):
    """min, mean, quantiles and max of a {length: count} histogram."""
    total = sum(histogram.values())
    if not total:
        return {}
    lengths = sorted(histogram)
    result = {"min": lengths[0], "mean": round(sum(k * v for k, v in histogram.items()) / total, 2)}
    wanted = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)]
    seen = 0
    for length in lengths:
        seen += histogram[length]
        while wanted and seen >= wanted[0][1] * total:
            result[wanted.pop(0)[0]] = length
    result["max"] = lengths[-1]
    return result


def print_table(summaries, file=sys.stdout):
    columns = ["source", "count", "words mean", "p50", "p90", "max", "tokens mean", *FLAGS]
    rows = [[s["source"], str(s["count"]), str(s["words"].get("mean", "")), str(s["words"].get("p50", "")),
             str(s["words"].get("p90", "")), str(s["words"].get("max", "")), str(s["tokens"].get("mean", "")),
             *(f"{s['flags'][f]} ({100 * s['flag_rates'][f]:.1f}%)" for f in FLAGS)] for s in summaries]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    for row in [columns, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=file)


def write_report(path, summaries, token_counter):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"token_counter": token_counter, "flags": list(FLAGS), "sources": summaries},
                  f, ensure_ascii=False, indent=1)


def token_counter(tokenizer_name):
    """(callable text -> token count, description) for the report."""
    if not tokenizer_name:
        return None, f"regex {TOKEN_PATTERN}"
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    return (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])), f"tokenizer {tokenizer_name}"


def truncated_flags(captions, truncated):
    """The truncated flag (True, False or None: unknown) of each of a record's captions: its "truncated"
    list aligned with a caption list (multi-caption JSONL), or its one flag when it has one caption."""
    if isinstance(truncated, list) and len(truncated) == len(captions):
        return [flag if isinstance(flag, bool) else None for flag in truncated]
    return [truncated if isinstance(truncated, bool) and len(captions) == 1 else None] * len(captions)


def iter_file_captions(path):
    """Yield (image, caption or list of captions, its "truncated" value or None, its source names or None) from
    composed.jsonl, our captions files, the multi-caption JSONL or its webdataset shards (KEY.json), or a
    composed_index.json; truncated_flags() reads the third."""
    if holds_shards(path):
        for record in iter_shard_records(path):
            yield record["image"], record["caption"], record.get("truncated"), record_sources(record)
        return
    if index_format(path) == "object":
        for image, caption in iter_json_object(path):
            yield image, caption, None, None
        return
    if detect_format(path) == "array":
        records = ((f"element {i}", r) for i, r in enumerate(iter_records(path, allow_truncated=True)))
    else:
        records = ((f"line {n}", r) for n, r in iter_json_lines(path, allow_partial_last=True))
    for where, record in records:
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or "caption" not in record:
            raise RecordError(f"{path}: {where}: expected an object with \"image\" and \"caption\"")
        yield record["image"], record["caption"], record.get("truncated"), record_sources(record)


def record_sources(record):
    """A multi-caption row's "sources" (the name of each caption), or None."""
    sources, captions = record.get("sources"), record["caption"]
    if isinstance(sources, list) and isinstance(captions, list) and len(sources) == len(captions):
        return [str(source) for source in sources]
    return None


def input_files(item):
    """The caption files of one INPUT: the file, a folder's captions-*.jsonl files (together one source), or
    webdataset shards."""
    if holds_shards(item):
        return [item]
    if os.path.isdir(item):
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(item) for f in fs if OUR_FILE.match(f))
        if not files:
            raise RecordError(f"no captions-*.jsonl files or .tar shards under {item}")
        return files
    if os.path.isfile(item):
        return [item]
    raise RecordError(f"no such file or folder: {item}")


def check_input(item, names, checker, new_stats, flagged):
    """Flag and count the captions of one INPUT, writing the flagged ones to `flagged` (a file or None);
    -> the summaries of its sources, one per caption name (source_label). new_stats: source name -> SourceStats."""
    sources = {}
    for path in input_files(item):
        for image, captions, truncated_field, names_here in iter_file_captions(path):
            if isinstance(captions, str):
                captions = [captions]
            elif not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise RecordError(f"{path}: the caption of {image} is neither a string nor a list of strings")
            truncated = truncated_flags(captions, truncated_field)
            for position, text in enumerate(captions):
                label = source_label(position, captions, names, names_here)
                if label not in sources:
                    sources[label] = new_stats(f"{item} {label}".strip())
                flags = checker.flags(text, truncated[position])
                sources[label].add(image, text, flags)
                if flagged and flags:
                    flagged.write(json.dumps({"source": sources[label].name, "image": image,
                                              "flags": list(flags), "caption": text}, ensure_ascii=False) + "\n")
    return [stats.summary() for stats in sources.values()]


def source_label(position, captions, names, row_sources):
    """The name of a caption: --names by position, else the row's own source names, else its position
    ("caption[1]"; "" for a file of single captions)."""
    if position < len(names):
        return names[position]
    if row_sources:
        return row_sources[position]
    return f"caption[{position}]" if len(captions) > 1 or position else ""


def parse_arguments(argv):
    parser = ArgumentParser(
        description="Flag suspicious captions (" + ", ".join(FLAGS) + ") and print statistics per caption "
                    "source. A caption file is one source; a folder is one source made of its captions-*.jsonl "
                    "files; in a multi-caption JSONL ({image, caption: [...]}) each position is a source.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="composed.jsonl, composed_index.json, captions-*.jsonl, a multi-caption JSONL, "
                             "a folder of captions-*.jsonl, or webdataset shards of merge_multi_caption.py (a "
                             ".tar or a folder of them)")
    parser.add_argument("--report", metavar="FILE", help="write the statistics, flag counts and examples as JSON")
    parser.add_argument("--flagged", metavar="FILE",
                        help="write every flagged caption as JSONL: {\"source\", \"image\", \"flags\", \"caption\"}")
    parser.add_argument("--names", help="comma-separated source names for the positions of a multi-caption "
                                        "JSONL (default: its rows' \"sources\", else caption[0], caption[1], ...)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt text to detect echoes of, besides the model scripts' preset prompts "
                             "(repeatable)")
    parser.add_argument("--examples", type=int, default=3, help="examples kept per flag and source (default 3)")
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer (hub id or folder) for token counts; "
                                            f"default: the regex {TOKEN_PATTERN}")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    names = args.names.split(",") if args.names else []
    try:
        count_tokens, counter_name = token_counter(args.tokenizer)
        checker = Checker(args.prompt)
        new_stats = functools.partial(SourceStats, examples=args.examples, count_tokens=count_tokens)
        summaries = []
        flagged = open(args.flagged, "w", encoding="utf-8") if args.flagged else None
        for item in args.inputs:
            summaries += check_input(item, names, checker, new_stats, flagged)
        if flagged:
            flagged.close()
    except RecordError as e:
        sys.exit(f"caption_qa.py: error: {e}")
    except OSError as e:
        sys.exit(f"caption_qa.py: error: {e.filename or ''}: {e.strerror}")
    print_table(summaries)
    if args.report:
        write_report(args.report, summaries, counter_name)
        print(f"caption_qa.py: report written to {args.report}")


if __name__ == "__main__":
    main()
