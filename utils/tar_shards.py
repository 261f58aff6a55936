"""Reading webdataset tar shards as img2dataset writes them, without unpacking them.

Shards are read with the standard library's tarfile in random-access mode: a pass over a shard reads its 512-byte
headers and seeks over member data, and a reader seeks to one member and reads just its bytes (the webdataset
package streams whole samples and gives no offsets). Samples are grouped as webdataset groups them: regular members
in file order, the key is the member path up to the first dot of its basename, the extension the rest
(lower-cased), and consecutive members with the same key form one sample (a repeated extension starts a new one).
The image is the first member whose extension ends in an image extension. A shard damaged mid-way keeps the samples
before the damage; the rest of that shard is skipped with a warning on stderr.
"""
import functools
import json
import os
import sys
import tarfile
from typing import NamedTuple

from utils.errors import InputError
from utils.images import UnreadableImage

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}


class TarMember(NamedTuple):
    name: str  # the member's path in the tar
    offset: int  # where its data starts in the file
    size: int


class TarSample(NamedTuple):
    key: str
    offset: int  # where its first member's header starts in the file
    members: dict  # lower-case extension -> TarMember, in file order


class DamagedShard(InputError):
    """A shard whose headers stop making sense after some samples (cut off or corrupt)."""


def holds_shards(path):
    """Whether a caption source names webdataset shards: a .tar file or a folder holding some."""
    if os.path.isdir(path):
        return any(name.lower().endswith(".tar") for name in os.listdir(path))
    return path.lower().endswith(".tar")


def open_tar(path):
    try:
        return tarfile.open(path, "r:")  # random access, uncompressed: next() seeks over member data
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"{path}: not a readable tar file ({e})") from None


def key_and_extension(name):
    """webdataset's split of a member path: (key, lower-case extension), or None when it has no extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def iter_tar_samples(path):
    """The samples of one tar shard in file order; DamagedShard after the last readable one."""
    with open_tar(path) as tar:
        sample, damage = None, None
        while True:
            try:
                info = tar.next()  # the next header; TarFile keeps one small TarInfo per member until closed
            except tarfile.TarError as e:
                damage = DamagedShard(f"{path}: damaged at byte {tar.offset} ({e})")
                break
            if info is None:  # the end-of-archive zero blocks, or a header tarfile could not parse
                damage = _damage_after_end(tar, path)
                break
            split = key_and_extension(info.name) if info.isreg() else None
            if split is None:
                continue  # not a sample's file: a folder, a name without an extension
            key, extension = split
            if sample is not None and (key != sample.key or extension in sample.members):
                yield sample
                sample = None
            if sample is None:
                sample = TarSample(key, info.offset, {})
            sample.members[extension] = TarMember(info.name, info.offset_data, info.size)
        if sample is not None:
            yield sample
        if damage is not None:
            raise damage


def _damage_after_end(tar, path):
    """A DamagedShard when what follows the last member is not zeros: tarfile ends quietly at a bad header."""
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(1 << 16).strip(b"\0"):
        return DamagedShard(f"{path}: damaged at byte {tar.offset} (not a tar header)")
    return None


def image_member(sample):
    """The first member whose extension ends in an image extension, or None."""
    for extension, member in sample.members.items():
        if extension.rpartition(".")[2] in IMAGE_EXTENSIONS:
            return member
    return None


def read_member(path, member):
    """The bytes of one member of a tar shard, read without touching the others."""
    try:
        with open(path, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
    except OSError as e:
        raise UnreadableImage(f"cannot read {path}: {e.strerror}") from None
    if len(data) < member.size:
        raise UnreadableImage(f"member cut off: {len(data)} of {member.size} bytes in the shard")
    return data


def tar_original(path, sample):
    """(the sample's original caption or None, the fields of its .json member): the caption is its .txt member,
    else "caption" in its .json member. A broken or odd member counts as absent."""
    metadata = {}
    if "json" in sample.members:
        try:
            metadata = json.loads(read_member(path, sample.members["json"]))
        except (UnreadableImage, ValueError):
            pass
        metadata = metadata if isinstance(metadata, dict) else {}
    caption = metadata.get("caption")
    if "txt" in sample.members:
        try:
            caption = read_member(path, sample.members["txt"]).decode("utf-8", errors="replace")
        except UnreadableImage:
            caption = None
    return (caption if isinstance(caption, str) else None), metadata


def warn_damaged(damage):
    print(f"warning: {damage}; the rest of this shard is skipped", file=sys.stderr, flush=True)


def sample_starts(files, bases):
    """(global byte position of each sample's start, shard path, TarSample) over all shards, in order."""
    for path, base in zip(files, bases):
        try:
            for sample in iter_tar_samples(path):
                yield base + sample.offset, path, sample
        except DamagedShard as damage:
            warn_damaged(damage)


@functools.lru_cache(maxsize=4)
def tar_index(path):
    """{member name: TarMember} and {key: [extensions]} of one shard: a worker's way from id to bytes."""
    members, keys = {}, {}
    try:
        for sample in iter_tar_samples(path):
            keys[sample.key] = list(sample.members)
            members.update((member.name, member) for member in sample.members.values())
    except DamagedShard:
        pass  # the planning pass warned; members after the damage have no ids
    return members, keys


def read_tar_image(path, name):
    members, keys = tar_index(path)
    if name in members:
        return read_member(path, members[name])
    if name in keys:
        raise UnreadableImage(f"sample {name} has no image member (it has: {', '.join(keys[name])})")
    raise UnreadableImage(f"no member {name} in the shard")
