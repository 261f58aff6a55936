"""utils/input_reader.py, tar_shards.py, parquet_files.py: what an INPUT names, tar shards and Parquet read as samples, ranks' slices, bytes by id."""
import itertools
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sample_images import image_bytes, write_tar_shard

from utils.errors import InputError
from utils.images import UnreadableImage
from utils.input_reader import check_inputs, expand_braces, expand_inputs, iter_samples, read_image_bytes
from utils.tar_shards import image_member, iter_tar_samples, tar_original

SHARD_SIZES = [5, 1, 8, 3]  # uneven shards, as img2dataset leaves them when downloads fail


def img2dataset_sample(number):
    key = f"{number:09d}"
    return key, {"jpg": image_bytes(number), "txt": f"web caption {number}", "json": f'{{"key": "{key}"}}'}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards in a folder: (folder, the key of every sample in order)."""
    folder = tmp_path_factory.mktemp("shards")
    keys, number = [], 0
    for index, size in enumerate(SHARD_SIZES):
        samples = [img2dataset_sample(number + i) for i in range(size)]
        write_tar_shard(folder / f"{index:05d}.tar", samples)
        keys += [key for key, _ in samples]
        number += size
    return folder, keys


def test_brace_patterns_expand_as_webdataset_does():
    assert expand_braces("data/{00008..00011}.tar") == [f"data/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(InputError, match="neither a list"):
        expand_braces("data/{x}.tar")


def test_a_file_a_folder_and_a_pattern_name_the_same_shards_and_ids(shards, tmp_path):
    folder, keys = shards
    files = [str(folder / f"{i:05d}.tar") for i in range(len(SHARD_SIZES))]
    by_folder = expand_inputs(str(folder))
    by_pattern = expand_inputs(f"{folder}/{{00000..{len(SHARD_SIZES) - 1:05d}}}.tar")
    assert by_folder.kind == by_pattern.kind == "tar"
    assert by_folder.files == by_pattern.files == files and by_folder.root == by_pattern.root == str(folder)
    assert expand_inputs(files[2]) == ("tar", [files[2]], str(folder))
    ids = [sample.image for sample in iter_samples(by_pattern, by_pattern.root)]
    assert ids[:2] == ["00000.tar/000000000.jpg", "00000.tar/000000001.jpg"] and len(ids) == len(keys)
    assert [sample.key for sample in iter_samples(by_folder, by_folder.root)] == keys
    assert check_inputs(by_folder).startswith("4 tar shards, ")


@pytest.mark.parametrize("spec, problem", [
    ("nowhere/{0..3}.tar", "4 of 4 files do not exist (first: nowhere/0.tar)"),
    ("nowhere.tar", "nowhere.tar: no such file or folder"),
    ("nowhere/{a,b}.json", "must name .tar files or .parquet files"),
    ("nowhere/*.tar", "nowhere/*.tar: the pattern matches no file"),
])
def test_inputs_that_name_nothing_give_one_clear_line(spec, problem):
    with pytest.raises(InputError, match=re.escape(problem)):
        expand_inputs(spec)


def test_a_folder_without_shards_and_a_file_that_is_not_a_tar(tmp_path):
    with pytest.raises(InputError, match=r"without .tar or .parquet files \(nor a data/ folder of .parquet files\)"):
        expand_inputs(str(tmp_path))
    (tmp_path / "00000.tar").write_text("<html>404</html>" * 100)
    with pytest.raises(InputError, match="00000.tar: not a readable tar file"):
        check_inputs(expand_inputs(str(tmp_path)))


def test_a_hub_dataset_folder_is_found_through_data_and_a_glob_picks_a_split(tmp_path):
    """The Hub's layout: data/<split>-NNNNN-of-NNNNN.parquet, also data/<split>/*.parquet; train first."""
    names = ["test-00000-of-00001.parquet", "train-00001-of-00002.parquet", "train-00000-of-00002.parquet",
             "validation/part-0.parquet"]
    for name in names:
        os.makedirs(os.path.dirname(tmp_path / "ds" / "data" / name), exist_ok=True)
        write_parquet(tmp_path / "ds" / "data" / name, {"image": pa.array([image_bytes(1)], pa.binary())})
    found = expand_inputs(str(tmp_path / "ds"))
    data = tmp_path / "ds" / "data"
    assert found == ("parquet", [str(data / names[2]), str(data / names[1]), str(data / names[3]),
                                 str(data / names[0])], str(data))
    assert [s.image for s in iter_samples(found, found.root)][:2] == ["train-00000-of-00002.parquet/0",
                                                                    "train-00001-of-00002.parquet/0"]
    assert expand_inputs(f"{tmp_path}/ds/data/train-*.parquet").files == [str(data / names[2]), str(data / names[1])]


def test_members_are_grouped_into_samples_as_webdataset_does(tmp_path):
    shard = write_tar_shard(tmp_path / "odd.tar", [
        ("a/001", {"txt": "first", "JPG": image_bytes(1)}),  # folder in the key, upper-case extension
        ("002", {"seg.png": image_bytes(2), "json": '{"caption": "from json"}'}),  # image extension at the end
        ("003", {"txt": "no image here"}),
        ("003", {"jpg": image_bytes(3)}),  # the same key again, a new extension: the same sample
        ("003", {"jpg": image_bytes(4)}),  # a repeated extension starts a new sample
    ])
    samples = list(iter_tar_samples(shard))
    assert [(s.key, list(s.members)) for s in samples] == [
        ("a/001", ["txt", "jpg"]), ("002", ["seg.png", "json"]), ("003", ["txt", "jpg"]), ("003", ["jpg"])]
    assert [image_member(s).name for s in samples] == ["a/001.JPG", "002.seg.png", "003.jpg", "003.jpg"]
    assert [tar_original(shard, s) for s in samples] == [
        ("first", {}), ("from json", {"caption": "from json"}), ("no image here", {}), (None, {})]
    assert read_image_bytes("odd.tar/002.seg.png", str(tmp_path)) == image_bytes(2)


def test_a_sample_without_an_image_and_a_missing_member_are_unreadable_with_a_reason(tmp_path):
    write_tar_shard(tmp_path / "s.tar", [("001", {"txt": "only text", "json": "{}"})])
    assert [s.image for s in iter_samples(expand_inputs(str(tmp_path / "s.tar")), str(tmp_path))] == ["s.tar/001"]
    with pytest.raises(UnreadableImage, match=r"sample 001 has no image member \(it has: txt, json\)"):
        read_image_bytes("s.tar/001", str(tmp_path))
    with pytest.raises(UnreadableImage, match="no member 002.jpg in the shard"):
        read_image_bytes("s.tar/002.jpg", str(tmp_path))
    with pytest.raises(UnreadableImage, match="file not found"):
        read_image_bytes("t.tar/001.jpg", str(tmp_path))


def test_a_cut_off_shard_keeps_the_samples_before_the_cut(tmp_path, capsys):
    shard = write_tar_shard(tmp_path / "cut.tar", [img2dataset_sample(n) for n in range(4)])
    whole = list(iter_tar_samples(shard))
    jpg = whole[2].members["jpg"]
    with open(shard, "r+b") as f:
        f.truncate(jpg.offset + jpg.size // 2)  # cut inside the third image
    samples = list(iter_samples(expand_inputs(str(shard)), str(tmp_path)))
    assert [s.key for s in samples] == [whole[0].key, whole[1].key, whole[2].key]
    assert "cut.tar: damaged at byte" in capsys.readouterr().err
    with pytest.raises(UnreadableImage, match="member cut off"):
        read_image_bytes(samples[2].image, str(tmp_path))


def test_a_corrupt_header_mid_shard_is_reported_not_taken_for_the_end(tmp_path, capsys):
    shard = write_tar_shard(tmp_path / "bad.tar", [img2dataset_sample(n) for n in range(3)])
    second = list(iter_tar_samples(shard))[1]
    with open(shard, "r+b") as f:
        f.seek(second.offset)
        f.write(b"garbage" * 20)
    assert len(list(iter_samples(expand_inputs(str(shard)), str(tmp_path)))) == 1
    assert "bad.tar: damaged at byte" in capsys.readouterr().err


@pytest.mark.parametrize("limit", [None, 0, 1, 6, 11, 100])
def test_every_world_size_takes_every_sample_exactly_once(shards, limit):
    folder, keys = shards
    inputs = expand_inputs(str(folder))
    expected = keys if limit is None else keys[:limit]
    for world in range(1, 9):
        slices = [[s.key for s in iter_samples(inputs, inputs.root, rank, world, limit)] for rank in range(world)]
        assert sum(slices, []) == expected, (world, slices)  # contiguous, in order, each once


def test_a_rank_reads_only_the_shards_of_its_byte_range(shards, tmp_path):
    folder, keys = shards
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        (tmp_path / name).write_bytes(data if name == "00000.tar" else b"x" * len(data))  # others unreadable
    inputs = expand_inputs(str(tmp_path))
    assert [s.key for s in iter_samples(inputs, inputs.root, 0, 4)] == keys[:SHARD_SIZES[0]]


def write_parquet(path, columns, row_group_size=3):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size, write_batch_size=2)
    return path


def test_parquet_images_from_struct_binary_and_path_columns(tmp_path):
    images = [image_bytes(n) for n in range(7)]
    struct = pa.StructArray.from_arrays([pa.array(images[:6] + [None], pa.binary()),
                                         pa.array([f"{n}.jpg" for n in range(7)])], names=["bytes", "path"])
    (tmp_path / "6.jpg").write_bytes(images[6])  # a row without bytes reads its path
    write_parquet(tmp_path / "hf.parquet", {"image": struct, "text": [f"t{n}" for n in range(7)],
                                            "width": [48] * 6 + [float("nan")], "labels": [[1]] * 7})
    write_parquet(tmp_path / "raw.parquet", {"id": list(range(100, 107)), "jpg": pa.array(images, pa.binary())})
    folder = tmp_path / "paths"
    folder.mkdir()
    write_parquet(folder / "p.parquet", {"path": [f"../{n}.jpg" for n in range(7)], "caption": ["c"] * 7})
    hf = expand_inputs(str(tmp_path / "hf.parquet"))
    samples = list(iter_samples(hf, hf.root, originals=True))
    # the scalar columns are the metadata, NaN as null (JSON has no NaN); the list column is not a scalar
    assert samples[3] == ("hf.parquet/3", "hf.parquet:3", "t3", {"width": 48})
    assert samples[6].metadata == {"width": None}
    assert [read_image_bytes(s.image, hf.root) for s in samples] == images
    raw = expand_inputs(str(tmp_path / "raw.parquet"))
    assert [s.key for s in iter_samples(raw, raw.root)] == [str(n) for n in range(100, 107)]
    assert read_image_bytes("raw.parquet/5", raw.root) == images[5]
    assert read_image_bytes("raw.parquet/1", raw.root) == images[1]  # behind the reader: the row group again
    (tmp_path / "dc").mkdir()
    write_parquet(tmp_path / "dc" / "0.parquet", {"uid": [f"{n:032x}" for n in range(7)], "jpg": pa.array(images)})
    datacomp = expand_inputs(str(tmp_path / "dc"))
    assert [s.key for s in iter_samples(datacomp, datacomp.root)][:2] == [f"{n:032x}" for n in range(2)]  # its uid
    paths = expand_inputs(str(folder))
    assert [s.image for s in iter_samples(paths, paths.root)][:2] == ["../0.jpg", "../1.jpg"]
    assert check_inputs(paths) == "1 Parquet file, 7 rows"


def test_parquet_rows_split_exactly_once_and_bad_files_give_one_line(tmp_path):
    for index, rows in enumerate([4, 0, 9]):
        write_parquet(tmp_path / f"{index}.parquet", {"image": pa.array([b"x"] * rows, pa.binary())})
    inputs = expand_inputs(str(tmp_path))
    every = [s.image for s in iter_samples(inputs, inputs.root)]
    assert every == [f"0.parquet/{r}" for r in range(4)] + [f"2.parquet/{r}" for r in range(9)]
    for world in (1, 2, 5, 20):
        for limit in (None, 6):
            slices = [[s.image for s in iter_samples(inputs, inputs.root, rank, world, limit)] for rank in range(world)]
            assert sum(slices, []) == every[:limit]
    write_parquet(tmp_path / "3.parquet", {"caption": ["no image"]})
    with pytest.raises(InputError, match=r"3.parquet: no image column .*columns: caption"):
        check_inputs(expand_inputs(str(tmp_path)))
    (tmp_path / "3.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="3.parquet: not a readable Parquet file"):
        check_inputs(expand_inputs(str(tmp_path)))


@pytest.mark.parametrize("kind", ["jsonl", "array"])
def test_json_parts_hold_every_entry_once_in_order(tmp_path, kind):
    """JSONL cut by bytes, a JSON array by count from the marks of its scan (more than two marks' worth of elements,
    some of them non-ASCII and on several lines): the parts of any world size hold every entry once, in order."""
    from utils.input_reader import read_part
    from utils.records import MARK_EVERY
    entries = [{"image": f"{index}-é.png" if index % 7 else f"{index}.png", "n": index}
               for index in range(2 * MARK_EVERY + 123)]
    path = tmp_path / ("in.jsonl" if kind == "jsonl" else "in.json")
    if kind == "jsonl":
        path.write_text("".join(json.dumps(entry, ensure_ascii=False) + ("\n\n" if i % 5 == 0 else "\n")
                                for i, entry in enumerate(entries)), encoding="utf-8")
    else:
        path.write_text("[" + ",\n  ".join(json.dumps(entry, ensure_ascii=False, indent=1 if i % 9 == 0 else None)
                                           for i, entry in enumerate(entries)) + "]", encoding="utf-8")
    for world in (1, 2, 3, 7):
        parts = [read_part(str(path), rank, world, None)[0] for rank in range(world)]
        assert [image for part in parts for image, _ in part] == [entry["image"] for entry in entries]
        assert [extra["n"] for part in parts for _, extra in part] == list(range(len(entries)))


def test_a_json_arrays_marks_are_kept_beside_the_outputs_while_it_is_unchanged(tmp_path):
    from utils.input_reader import read_part
    from utils.records import MARK_EVERY
    path, marks = tmp_path / "in.json", tmp_path / "out" / ".input-marks"
    count = MARK_EVERY + 10
    path.write_text(json.dumps([{"image": f"{i}.png"} for i in range(count)]))
    first = read_part(str(path), 1, 2, None, marks_folder=str(marks))
    kept = list(marks.iterdir())
    assert len(kept) == 1 and json.loads(kept[0].read_text())["elements"] == count
    assert read_part(str(path), 1, 2, None, marks_folder=str(marks)) == first
    path.write_text(json.dumps([{"image": f"{i}.png"} for i in range(count + 2)]))  # changed: scanned again
    assert [image for image, _ in read_part(str(path), 1, 2, None, marks_folder=str(marks))[0]] == [
        f"{i}.png" for i in range((count + 2) // 2, count + 2)]


def test_a_json_array_reads_as_json_load_reads_it(tmp_path):
    """Runs of whole elements are parsed at once up to the last "}" of a stretch of text: a "}" inside a string or a
    nested object, nested arrays, blanks, non-ASCII and chunk borders change nothing; an error still names its
    element, and a file cut off mid-element still ends after the last whole one."""
    from utils.records import RecordError, iter_json_array
    tricky = ['a}.png', '}, {"image": "x"}', 'b\\"}.png', 'é}ü.png']
    entries = [{"image": f"{i}-{tricky[i % 4]}" if i % 3 else f"{i}.png", "meta": {"n": i, "tags": [i, {"k": "}"}]}}
               for i in range(30_000)]
    text = "[\n" + ",\n".join(json.dumps(entry, ensure_ascii=i % 2 == 0) for i, entry in enumerate(entries)) + "\n]"
    path = tmp_path / "in.json"
    plain = [{"image": f"images/{i:09d}.jpg"} for i in range(60_000)]  # chunk borders inside elements with no "}"
    path.write_text(json.dumps(plain, indent=0))
    assert list(itertools.islice(iter_json_array(path), len(plain) + 1)) == plain  # a reader going round fails
    path.write_text(text, encoding="utf-8")
    assert list(iter_json_array(path)) == entries
    broken = text.replace('{"image": "20001.png"', '{"image": "20001.png",,', 1)
    assert broken != text
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(RecordError, match="not valid JSON at element 20001 "):
        list(iter_json_array(path))
    path.write_text(text[:text.index('{"image": "25002.png"') + 30], encoding="utf-8")
    ended = []
    assert list(iter_json_array(path, allow_truncated=True, on_partial=ended.append)) == entries[:25002]
    assert ended == ["half-written element 25002"]
