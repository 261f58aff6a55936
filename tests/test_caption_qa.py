"""utils/caption_qa.py and the QA options of merge_multi_caption.py, run as a user runs them."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LONG_CUT = ("The image shows a man standing in front of an old brick building with a red door and a small "
            "sign above it, he wears a blue shirt and dark jeans and holds a cup of coffee in his right hand "
            "while looking at the")

# caption -> the exact flags it must get (no "truncated" field: the text decides)
CRAFTED = {
    "A dog runs on the beach.": [],
    "cat, dog, tree, sky": [],  # a noun list has no final full stop and is not cut off
    "Photo of a dog on the beach": [],  # neither is a web alt-text
    "The sign says \"Stop!\"": [],
    "A dog. It runs. \n": [],  # trailing whitespace after the full stop
    "I can see a cat. It cannot climb the tree because it is too old.": [],  # "cannot", yet no refusal
    "": ["empty"],
    "   \n": ["empty"],
    "A dog runs on the beach. The sky is blue and the water": ["truncated"],
    LONG_CUT: ["truncated"],
    "The dog is happy. The dog is happy. The dog is happy. The dog is happy. The dog is happy.": ["repetition"],
    "A red red red car.": ["repetition"],
    "A cat on a mat, on a mat, on a mat.": ["repetition"],
    "I'm sorry, but I cannot describe this image.": ["refusal"],
    "I’m unable to see the image.": ["refusal"],
    "As an AI, I can't view pictures.": ["refusal"],
    "Describe the image in detail. A dog on a beach.": ["prompt_echo"],
    "A dog.###Human: describe it": ["prompt_echo"],
    "<|im_start|>assistant A dog on a beach.": ["prompt_echo"],
    "Briefly describe the image with just a few words: dog": ["prompt_echo"],
    "Sorry, I cannot see the image. The image is a photo of a man in a red shirt who": ["truncated", "refusal"],
}


def run(script, *args, ok=True):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "utils", script), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def write_lines(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_crafted_captions_get_exactly_the_expected_flags(tmp_path):
    captions = list(CRAFTED)
    write_lines(tmp_path / "composed.jsonl", [{"image": f"{i}.jpg", "caption": c} for i, c in enumerate(captions)])
    result = run("caption_qa.py", tmp_path / "composed.jsonl", "--flagged", tmp_path / "flagged.jsonl",
                 "--report", tmp_path / "qa.json")
    flagged = {row["image"]: row["flags"] for row in read_lines(tmp_path / "flagged.jsonl")}
    got = {caption: flagged.get(f"{i}.jpg", []) for i, caption in enumerate(captions)}
    assert got == CRAFTED
    report = json.load(open(tmp_path / "qa.json"))
    (source,) = report["sources"]
    expected_counts = {flag: sum(flag in flags for flags in CRAFTED.values())
                       for flag in ("empty", "truncated", "repetition", "refusal", "prompt_echo")}
    assert source["flags"] == expected_counts
    assert source["count"] == len(CRAFTED)
    assert all(len(examples) <= 3 for examples in source["examples"].values())
    assert report["token_counter"].startswith("regex")
    assert "refusal" in result.stdout.splitlines()[0]  # the table header


def test_truncated_field_wins_over_the_text(tmp_path):
    """Our captions files say whether generation hit the token limit; that decides."""
    folder = tmp_path / "outputs" / "qwen" / "ckpt" / "default"
    folder.mkdir(parents=True)
    write_lines(folder / "captions-00000-of-00001.jsonl", [
        {"image": "a.jpg", "caption": "A dog.", "truncated": True},
        {"image": "b.jpg", "caption": "A dog runs. The sky is", "truncated": False},
        {"image": "c.jpg", "caption": "A dog runs. The sky is"}])
    run("caption_qa.py", folder, "--flagged", tmp_path / "flagged.jsonl")
    assert [(r["image"], r["flags"]) for r in read_lines(tmp_path / "flagged.jsonl")] == [
        ("a.jpg", ["truncated"]), ("c.jpg", ["truncated"])]


def test_statistics_per_source_of_a_multi_caption_file(tmp_path):
    write_lines(tmp_path / "multi.jsonl", [
        {"image": "a.jpg", "caption": ["web a", "One two three four.", "I'm sorry."]},
        {"image": "b.jpg", "caption": ["web b", "One two, three.", ""]}])
    result = run("caption_qa.py", tmp_path / "multi.jsonl", "--names", "original,detail,noun",
                 "--report", tmp_path / "qa.json")
    sources = json.load(open(tmp_path / "qa.json"))["sources"]
    assert [s["source"].split()[-1] for s in sources] == ["original", "detail", "noun"]
    detail = sources[1]
    assert detail["count"] == 2
    assert detail["words"] == {"min": 3, "mean": 3.5, "p50": 3, "p90": 4, "p99": 4, "max": 4}
    # regex tokens: words and punctuation marks: 5 and 5
    assert detail["tokens"]["mean"] == 5.0
    assert sources[2]["flags"]["refusal"] == 1 and sources[2]["flags"]["empty"] == 1
    assert sources[2]["flag_rates"]["empty"] == 0.5
    assert len(result.stdout.strip().splitlines()) == 4 + 1  # header, 3 sources, report line


def test_merge_multi_caption_qa_trim_and_drop(tmp_path):
    write_lines(tmp_path / "original.jsonl", [{"image": f"{i}.jpg", "caption": f"web {i}"} for i in range(4)])
    write_lines(tmp_path / "composed.jsonl", [
        {"image": "0.jpg", "caption": "A dog runs. The sky is"},
        {"image": "1.jpg", "caption": "A cat.", "truncated": True},  # nothing complete to trim back to
        {"image": "2.jpg", "caption": "I cannot describe this image."},
        {"image": "3.jpg", "caption": "A cup."}])
    result = run("merge_multi_caption.py", "--original", tmp_path / "original.jsonl", "--index",
                 tmp_path / "composed.jsonl", "--output", tmp_path / "out.jsonl", "--qa-report", tmp_path / "qa.json",
                 "--trim-truncated", "--names", "model")
    sources = {"sources": ["original", "model"]}
    assert read_lines(tmp_path / "out.jsonl") == [
        {"image": "0.jpg", "caption": ["web 0", "A dog runs."], "truncated": [None, False], **sources},  # trimmed
        {"image": "1.jpg", "caption": ["web 1", "A cat."], "truncated": [None, True], **sources},
        {"image": "2.jpg", "caption": ["web 2", "I cannot describe this image."],  # flagged, not dropped
         "truncated": [None, None], **sources},
        {"image": "3.jpg", "caption": ["web 3", "A cup."], "truncated": [None, None], **sources}]
    assert "1 trimmed" in result.stdout
    sources = json.load(open(tmp_path / "qa.json"))["sources"]
    assert [s["flags"]["truncated"] for s in sources] == [0, 2]
    assert sources[1]["examples"]["refusal"] == [{"image": "2.jpg", "caption": "I cannot describe this image."}]

    run("merge_multi_caption.py", "--original", tmp_path / "original.jsonl", "--index", tmp_path / "composed.jsonl",
        "--output", tmp_path / "out.jsonl", "--drop-flagged", "refusal", "--missing", "keep-shorter")
    assert [row["caption"] for row in read_lines(tmp_path / "out.jsonl")] == [
        ["web 0", "A dog runs. The sky is"], ["web 1", "A cat."], ["web 2"], ["web 3", "A cup."]]


def test_qa_errors(tmp_path):
    result = run("caption_qa.py", tmp_path / "nope.jsonl", ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"caption_qa.py: error: no such file or folder: {tmp_path / 'nope.jsonl'}"
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "A."}\n{"image": "b.jpg"}\n')
    result = run("caption_qa.py", tmp_path / "bad.jsonl", ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "bad.jsonl: line 2" in result.stderr


def truncated_counts(*inputs_and_flags):
    """caption_qa.py's truncated count per source, from its JSON report."""
    report = inputs_and_flags[-1]
    run("caption_qa.py", *inputs_and_flags[:-1], "--report", report)
    return [source["flags"]["truncated"] for source in json.load(open(report))["sources"]]


def test_merge_keeps_the_truncated_rate(tmp_path):
    """The same truncation counts per source before and after merge_multi_caption.py, also when its output is
    merged again: the flags travel with the captions, unknown ones stay unknown (the text decides again)."""
    cut = "A dog runs. The sky is"  # looks cut off: flagged unless a truncated field says otherwise
    write_lines(tmp_path / "original.jsonl", [{"image": f"{i}.jpg", "caption": [f"web {i}", cut, LONG_CUT][i % 3]}
                                              for i in range(6)])
    write_lines(tmp_path / "composed.jsonl", [
        {"image": "0.jpg", "caption": cut, "truncated": False},  # the model ended here: not truncated
        {"image": "1.jpg", "caption": "A cat.", "truncated": True},  # hit the limit, though it looks complete
        {"image": "2.jpg", "caption": cut},  # no field: the text decides
        {"image": "3.jpg", "caption": "A cup."}, {"image": "4.jpg", "caption": cut, "truncated": True},
        {"image": "5.jpg", "caption": LONG_CUT, "truncated": False}])
    (tmp_path / "noun_index.json").write_text(json.dumps({f"{i}.jpg": [cut, "dog, sky"][i % 2] for i in range(6)}))
    before = [truncated_counts(tmp_path / name, tmp_path / f"qa-{name}.json")[0]
              for name in ("original.jsonl", "composed.jsonl", "noun_index.json")]
    assert before == [4, 3, 3]
    run("merge_multi_caption.py", "--original", tmp_path / "original.jsonl", "--index", tmp_path / "composed.jsonl",
        "--index", tmp_path / "noun_index.json", "--output", tmp_path / "multi.jsonl")
    assert truncated_counts(tmp_path / "multi.jsonl", tmp_path / "qa-multi.json") == before
    assert [row["truncated"] for row in read_lines(tmp_path / "multi.jsonl")][:2] == [
        [None, False, None], [None, True, None]]
    run("merge_multi_caption.py", "--original", tmp_path / "multi.jsonl", "--index", tmp_path / "composed.jsonl",
        "--output", tmp_path / "chained.jsonl", "--buckets", "3")
    assert truncated_counts(tmp_path / "chained.jsonl", tmp_path / "qa-chained.json") == before + before[1:2]
