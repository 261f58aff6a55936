"""utils/merge.py and utils/merge_multi_caption.py, run as a user runs them."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, cwd=ROOT, ok=True):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "utils", script), *map(str, args)],
                            cwd=cwd, capture_output=True, text=True, timeout=120)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_lines(path, records, partial=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if partial:
            f.write(partial)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def ours(image, caption, truncated=False):
    """A caption line as the loop writes it; a tar shard's or Parquet row's also has a key (here: d.jpg's)."""
    return {"image": image, "caption": caption, "model": "qwen", "prompt": "default", "truncated": truncated,
            "id": image.upper(), **({"key": "000000003"} if image == "d.jpg" else {})}


@pytest.fixture
def run_folder(tmp_path):
    """outputs/qwen/ckpt/default after a run with 2 processes killed mid-line and resumed with 3,
    which captioned one image again (a duplicate with another caption)."""
    folder = tmp_path / "outputs" / "qwen" / "ckpt" / "default"
    write_lines(folder / "captions-00000-of-00002.jsonl",
                [ours("a.jpg", "A cat."), ours("b b.jpg", 'A "quoted" dog, été.', truncated=True)],
                partial='{"image": "c.jpg", "capt')
    write_lines(folder / "captions-00001-of-00002.jsonl", [ours("d.jpg", "A car.")])
    write_lines(folder / "captions-00000-of-00003.jsonl", [ours("c.jpg", "A cup.")])
    write_lines(folder / "captions-00001-of-00003.jsonl", [ours("a.jpg", "Another cat.")])
    write_lines(folder / "captions-00002-of-00003.jsonl", [ours("e/f.jpg", "")])
    # Not captions: must be ignored.
    write_lines(folder.parent / "errors-00000-of-00002.jsonl", [{"image": "x.jpg", "error": "broken"}])
    return folder


# First seen wins; files are read in name order: captions-00000-of-00002 (a, b), captions-00000-of-00003
# (c), captions-00001-of-00002 (d), captions-00001-of-00003 (a again: dropped), captions-00002-of-00003.
EXPECTED_OURS = [("a.jpg", "A cat."), ("b b.jpg", 'A "quoted" dog, été.'), ("c.jpg", "A cup."),
                 ("d.jpg", "A car."), ("e/f.jpg", "")]


def check_composed(folder, expected, truncated=()):
    rows = read_lines(folder / "composed.jsonl")
    assert [(r["image"], r["caption"]) for r in rows] == expected
    assert [r["image"] for r in rows if r["truncated"]] == list(truncated)  # true or false on every row
    assert [list(r) for r in rows] == [["image", "caption", "truncated", *(["key"] if i == "d.jpg" else [])]
                                       for i, _ in expected]
    assert [r["key"] for r in rows if "key" in r] == (["000000003"] if ("d.jpg", "A car.") in expected else [])
    with open(folder / "composed_index.json", encoding="utf-8") as f:
        index = json.load(f)
    assert list(index.items()) == expected


def test_bare_merge_of_outputs_folder(run_folder):
    """`python utils/merge.py` in the folder where generate.sh wrote outputs/."""
    result = run("merge.py", cwd=run_folder.parents[3])
    check_composed(run_folder, EXPECTED_OURS, truncated=["b b.jpg"])
    line = result.stdout.strip()
    assert len(line.splitlines()) == 1
    assert "5 rows from 5 files" in line and "1 duplicates" in line and "1 partial" in line


def test_output_dir_without_inputs_merges_in_place(run_folder, tmp_path):
    run("merge.py", "--output-dir", tmp_path / "outputs", cwd=tmp_path.parent)
    check_composed(run_folder, EXPECTED_OURS, truncated=["b b.jpg"])


def test_explicit_folder_with_output_dir_and_several_groups(run_folder, tmp_path):
    other = run_folder.parent / "short"
    write_lines(other / "captions-00000-of-00001.jsonl", [ours("a.jpg", "cat")])
    result = run("merge.py", tmp_path / "outputs", "--output-dir", tmp_path / "merged", "--buckets", "7")
    check_composed(tmp_path / "merged" / "qwen" / "ckpt" / "default", EXPECTED_OURS, truncated=["b b.jpg"])
    check_composed(tmp_path / "merged" / "qwen" / "ckpt" / "short", [("a.jpg", "cat")])
    assert len(result.stdout.strip().splitlines()) == 2
    assert not (run_folder / "composed.jsonl").exists()


ORIGINAL_ARRAYS = {
    # rank: text of the original scripts' per-rank file: '[' then json.dump(element) + ',' ... ']'
    0: '[{"image": "r0a.jpg", "caption": "zero a"},{"image": "r0b.jpg", "caption": "zero b"}]',
    1: '[{"image": "r1a.jpg", "caption": "one a"},',  # killed after a comma
    2: '[{"image": "r2a.jpg", "caption": "two a"},{"image": "r2b.jpg", "capt',  # half an element
    3: '[{"image": "r3a.jpg", "caption": "three a"}',  # no closing bracket
    10: '[{"image": "r10a.jpg", "caption": "ten a"},{"image": "r0a.jpg", "caption": "dup"}]',
}


@pytest.fixture
def original_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for rank, text in ORIGINAL_ARRAYS.items():
        (folder / f"in_qwenvl_cc12m_{rank}.json").write_text(text)
    (folder / "in_internvl_cc12m_0.json").write_text('[{"image": "r0a.jpg", "caption": "internvl a"}]')
    # The input list the original scripts read sits next to their outputs and must be ignored.
    (folder / "in_2.json").write_text('[{"image": "r0a.jpg"}]')
    return folder


def test_original_cut_off_arrays_round_trip(original_folder):
    result = run("merge.py", original_folder)
    qwen = [("r0a.jpg", "zero a"), ("r0b.jpg", "zero b"), ("r1a.jpg", "one a"), ("r2a.jpg", "two a"),
            ("r3a.jpg", "three a"), ("r10a.jpg", "ten a")]
    assert [(r["image"], r["caption"]) for r in read_lines(original_folder / "in_qwenvl_cc12m_composed.jsonl")] == qwen
    with open(original_folder / "in_qwenvl_cc12m_composed_index.json") as f:
        assert list(json.load(f).items()) == qwen
    assert read_lines(original_folder / "in_internvl_cc12m_composed.jsonl") == [
        {"image": "r0a.jpg", "caption": "internvl a"}]
    assert "1 duplicates" in result.stdout and "3 partial" in result.stdout


def test_original_arrays_as_files_to_output_dir(original_folder, tmp_path):
    files = [original_folder / f"in_qwenvl_cc12m_{rank}.json" for rank in (10, 2, 0)]
    run("merge.py", *files, "--output-dir", tmp_path / "merged")
    rows = read_lines(tmp_path / "merged" / "composed.jsonl")
    # Rank order whatever the order on the command line; r0a first seen in rank 0.
    assert [(r["image"], r["caption"]) for r in rows] == [
        ("r0a.jpg", "zero a"), ("r0b.jpg", "zero b"), ("r2a.jpg", "two a"), ("r10a.jpg", "ten a")]


def test_merge_errors(tmp_path):
    assert_one_line_error(run("merge.py", tmp_path / "nope", ok=False), "no such file or folder", "nope")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("merge.py", tmp_path / "empty", ok=False), "no caption files")
    assert_one_line_error(run("merge.py", cwd=tmp_path, ok=False), "outputs")
    bad = tmp_path / "bad" / "captions-00000-of-00001.jsonl"
    write_lines(bad, [ours("a.jpg", "A cat.")])
    with open(bad, "a") as f:
        f.write("{not json}\n" + json.dumps(ours("b.jpg", "B")) + "\n")
    assert_one_line_error(run("merge.py", bad.parent, ok=False), str(bad), "2", "not valid JSON")
    write_lines(bad, [ours("a.jpg", "A cat."), {"image": "b.jpg"}])
    assert_one_line_error(run("merge.py", bad, ok=False), str(bad), "line 2", "caption")
    array = tmp_path / "x_0.json"
    array.write_text('[{"image": "a.jpg", "caption": "A"}, 7]')
    assert_one_line_error(run("merge.py", array, ok=False), str(array), "element 1")
    assert not list((tmp_path / "bad").glob(".merge-*")), "temporary files left behind"


def test_misspelt_flag_is_answered_in_one_line_with_a_suggestion(tmp_path):
    """utils/arguments.py: no usage block, and the flag that was meant."""
    result = run("merge.py", "--wrokers", "2", cwd=tmp_path, ok=False)
    assert result.returncode == 2 and not result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and "--workers" in lines[-1], result.stderr
    assert lines[0].startswith("merge.py: error: unrecognized argument --wrokers"), result.stderr


# merge_multi_caption.py

ORIGINAL = [("p/1.jpg", "one"), ("p/2.jpg", "two"), ("p/3.jpg", "three"), ("p/4.jpg", "four"),
            ("p/5.jpg", "five"), ("p/6.jpg", "six")]


@pytest.fixture
def multi(tmp_path):
    """The original JSONL; index A as a composed_index.json of the original scripts (misses 4), index B as a
    composed.jsonl in a folder (misses 2, caption 5 truncated), both in an order of their own."""
    write_lines(tmp_path / "original.jsonl", [{"image": i, "caption": c} for i, c in ORIGINAL])
    a = {i: f"A {c}" for i, c in reversed(ORIGINAL) if i != "p/4.jpg"}
    (tmp_path / "detail_index.json").write_text(json.dumps(a))
    write_lines(tmp_path / "noun" / "composed.jsonl",
                [{"image": i, "caption": f"B {c}", **({"truncated": True} if i == "p/5.jpg" else {})}
                 for i, c in ORIGINAL[::2] + ORIGINAL[3::2]])
    return tmp_path


def noun_truncated(image):
    """The noun index's flag: true where this composed.jsonl says so, else unknown (it has no flag there)."""
    return True if image == "p/5.jpg" else None


def test_multi_caption_drop_missing(multi):
    result = run("merge_multi_caption.py", "--original", multi / "original.jsonl", "--index",
                 multi / "detail_index.json", "--index", multi / "noun", "--output", multi / "out.jsonl")
    assert read_lines(multi / "out.jsonl") == [
        {"image": i, "caption": [c, f"A {c}", f"B {c}"], "truncated": [None, None, noun_truncated(i)],
         "sources": ["original", "detail_index", "noun"]} for i, c in ORIGINAL if i not in ("p/2.jpg", "p/4.jpg")]
    assert "detail_index.json: 5 entries, 1 original images missing" in result.stdout
    assert "composed.jsonl: 5 entries, 1 original images missing" in result.stdout
    assert "6 original rows, 4 written, 2 dropped" in result.stdout


def test_multi_caption_keep_shorter_many_buckets(multi):
    """Order restored across buckets; a pretty-printed composed_index.json; index order kept."""
    (multi / "detail_index.json").write_text(json.dumps(json.loads((multi / "detail_index.json").read_text()),
                                                        indent=2))
    run("merge_multi_caption.py", "--original", multi / "original.jsonl", "--index", multi / "noun" / "composed.jsonl",
        "--index", multi / "detail_index.json", "--output", multi / "out.jsonl", "--missing", "keep-shorter",
        "--buckets", "5")
    expected = []
    for i, c in ORIGINAL:
        captions = [c] + ([f"B {c}"] if i != "p/2.jpg" else []) + ([f"A {c}"] if i != "p/4.jpg" else [])
        truncated = [None] + ([noun_truncated(i)] if i != "p/2.jpg" else []) + ([None] if i != "p/4.jpg" else [])
        sources = ["original"] + (["noun"] if i != "p/2.jpg" else []) + (["detail_index"] if i != "p/4.jpg" else [])
        expected.append({"image": i, "caption": captions, "truncated": truncated, "sources": sources})
    assert read_lines(multi / "out.jsonl") == expected


def test_multi_caption_order_at_scale(tmp_path):
    """Thousands of rows over many buckets: output order is exactly the original's."""
    images = [f"img/{(i * 7919) % 5000:05d}.jpg" for i in range(5000)]
    write_lines(tmp_path / "original.jsonl", [{"image": p, "caption": p[4:9]} for p in images])
    write_lines(tmp_path / "idx" / "composed.jsonl", [{"image": p, "caption": "x" + p} for p in sorted(images)])
    run("merge_multi_caption.py", "--original", tmp_path / "original.jsonl", "--index", tmp_path / "idx",
        "--output", tmp_path / "out.jsonl", "--buckets", "37")
    assert read_lines(tmp_path / "out.jsonl") == [{"image": p, "caption": [p[4:9], "x" + p], "truncated": [None, None],
                                                   "sources": ["original", "idx"]} for p in images]


def test_both_scripts_chain(run_folder, tmp_path):
    """Per-rank files -> merge.py -> merge_multi_caption.py, as in the README."""
    run("merge.py", cwd=tmp_path)
    write_lines(tmp_path / "original.jsonl", [{"image": i, "caption": f"web {i}"} for i, _ in EXPECTED_OURS])
    run("merge_multi_caption.py", "--original", tmp_path / "original.jsonl", "--index", run_folder,
        "--index", run_folder / "composed_index.json", "--output", tmp_path / "multi.jsonl")
    assert read_lines(tmp_path / "multi.jsonl") == [
        {"image": i, "caption": [f"web {i}", c, c], "truncated": [None, i == "b b.jpg", None],
         "sources": ["original", "ckpt-default", "ckpt-default-2"]} for i, c in EXPECTED_OURS]


def test_multi_caption_errors(multi):
    base = ["--original", multi / "original.jsonl", "--output", multi / "out.jsonl"]
    assert_one_line_error(run("merge_multi_caption.py", *base, "--index", multi / "nope.json", ok=False),
                          "no such file or folder", "nope.json")
    (multi / "empty").mkdir()
    assert_one_line_error(run("merge_multi_caption.py", *base, "--index", multi / "empty", ok=False),
                          "no composed.jsonl or composed_index.json")
    (multi / "cut_index.json").write_text('{"p/1.jpg": "A one", "p/2.jpg": "A t')
    assert_one_line_error(run("merge_multi_caption.py", *base, "--index", multi / "cut_index.json", ok=False),
                          "cut_index.json", "member 1")
    (multi / "list_index.json").write_text('["p/1.jpg"]')
    assert_one_line_error(run("merge_multi_caption.py", *base, "--index", multi / "list_index.json", ok=False),
                          "list_index.json")
    (multi / "bad.jsonl").write_text('{"image": "p/1.jpg", "caption": "one"}\n{"image": 3}\n')
    assert_one_line_error(run("merge_multi_caption.py", "--original", multi / "bad.jsonl", "--output",
                              multi / "out.jsonl", "--index", multi / "noun", ok=False), "bad.jsonl:2")
    result = run("merge_multi_caption.py", *base, "--index", multi / "noun", "--drop-flagged", "rude", ok=False)
    assert result.returncode != 0 and "unknown flag rude" in result.stderr
    two = [*base, "--index", multi / "noun", "--index", multi / "detail_index.json"]
    assert_one_line_error(run("merge_multi_caption.py", *two, "--txt", "nouns", ok=False),
                          "--txt nouns: neither random nor a source (original, noun, detail_index)")
    assert_one_line_error(run("merge_multi_caption.py", *two, "--names", "noun", ok=False),
                          "--names gives 1 names for 2 --index")
    assert_one_line_error(run("merge_multi_caption.py", *two, "--names", "noun,Detail.v2", ok=False),
                          "'Detail.v2' is not a source name")
    assert_one_line_error(run("merge_multi_caption.py", *two, "--names", "noun,original", ok=False),
                          "repeat the original's original")
    assert_one_line_error(run("merge_multi_caption.py", *two, "--image-extension", ".jpg", ok=False),
                          "--image-extension: '.jpg' is not an extension")


def test_generate_then_bare_merge(qwen_checkpoint, tmp_path):
    """qwen.py on a tiny checkpoint as rank 1 of 2 writing to outputs/, then a bare
    `python utils/merge.py` there: one composed row per image, each the caption the rank file holds."""
    from conftest import run_command
    from PIL import Image
    from sample_images import _pattern, write_input
    names = []
    for i in range(5):
        names.append(f"img {i}.png")
        Image.fromarray(_pattern(40 + 6 * i, 48, 7 + i)).save(tmp_path / names[-1])
    input_file = write_input(tmp_path / "in.json", names)
    run_command(["python", os.path.join(ROOT, "qwen.py"), "--input-json", str(input_file), "--model",
                 qwen_checkpoint, "--max-new-tokens", "5", "--temperature", "0", "--num-workers", "0",
                 "--output-dir", str(tmp_path / "outputs")], env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    (folder,) = (tmp_path / "outputs" / "qwen").glob("*/default")
    rows = read_lines(folder / "captions-00001-of-00002.jsonl")
    assert sorted(row["image"] for row in rows) == names[2:]  # rank 1's contiguous slice
    result = run("merge.py", cwd=tmp_path)
    check_composed(folder, [(row["image"], row["caption"]) for row in rows],
                   truncated=[row["image"] for row in rows if row["truncated"]])
    assert "3 rows from 1 file, 0 duplicates" in result.stdout
