"""What --model names: checked and identified before the model loads, then fetched as a local folder to load.

A value that exists on disk, or that starts with / . ~ or has more than one /, is a local path; anything else
shaped like "name" or "org/name" is a Hugging Face hub id. A hub id is asked of the hub with a short timeout;
when the hub cannot be reached, its cached snapshot is used and this process stays offline, because
transformers would otherwise retry for minutes before it falls back to the cache.

    identify_checkpoint(model)                    the run record's identity of a file, folder or hub id
    fetch_folder(value, allow_patterns, what)     a local folder: the folder itself, or a hub id's snapshot
                                                  (only the files a script loads), from the cache or downloaded
    download_file(url, path, flag)                a file fetched once into a cache (MiniGPT-4's LAVIS files)
"""
import fcntl
import fnmatch
import functools
import hashlib
import http.client
import json
import os
import re
import socket
import sys

from utils.errors import UserError
from utils.file_hashes import content_digest, kept_digests

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_TIMEOUT = 10  # seconds for the hub to answer; huggingface_hub's own default for metadata requests
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf")
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".yaml", ".yml", ".tiktoken")
LARGEST_HASHED = 64 << 20  # a larger file is hashed with BLAKE3 on all cores, and its digest kept
DOWNLOAD_TIMEOUT = 30  # seconds a download_file() may wait for the server before it counts as failed (no network)


def is_hub_id(value):
    return HUB_ID.fullmatch(value) is not None and "--" not in value and ".." not in value and value[-1] not in ".-"


def digest_file(path, kept):
    """A file by its contents: sha256 of a small one; BLAKE3 of a large one (weights), kept for the next run
    (utils/file_hashes.py: kept, the digests already known)."""
    if os.path.getsize(path) > LARGEST_HASHED:
        return content_digest(path, kept)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def hash_contents(path):
    """sha256 over a file, or over a folder's config, tokenizer and weight files (its top level: a checkpoint's
    files), each by name and the digest of its bytes, so that checkpoints differing in one tensor differ."""
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if not name.startswith(".") and
                       name.endswith(CONFIG_SUFFIXES + WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(path, name)))
        files = [(name, os.path.join(path, name)) for name in names]
    else:
        files = [(os.path.basename(path), path)]
    digest, kept = hashlib.sha256(), kept_digests()
    for name, file in files:
        digest.update(f"{name}\0{digest_file(file, kept)}\n".encode())
    return "sha256:" + digest.hexdigest()


def find_cached_snapshot(repo_id):
    """The folder of a hub id's cached snapshot with its config and weights, or None."""
    from huggingface_hub import try_to_load_from_cache
    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    folder = os.path.dirname(config)
    return folder if any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(folder)) else None


def stay_offline():
    """From now on huggingface_hub (and transformers through it) reads only the cache in this process."""
    from huggingface_hub import constants
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def ask_hub_commit(repo_id, what):
    """(the hub's current commit of a hub id, None), or (None, why not) when the hub cannot be reached."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    try:
        return get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT).commit_hash, None
    except GatedRepoError:
        raise UserError(f"{what} {repo_id}: a gated model on the Hugging Face hub; accept its terms on the hub "
                        f"and log in (hf auth login), or pass {what} /path/to/a/local/copy") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what} {repo_id}: no such local folder, and no such model on the Hugging Face hub "
                        "(a private one needs hf auth login)") from None
    except EntryNotFoundError:
        raise UserError(f"{what} {repo_id}: this hub repository has no config.json; it is not a checkpoint") from None
    except Exception as error:  # no network, a proxy, a timeout, a hub outage: all mean "not reachable"
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


@functools.lru_cache(maxsize=None)
def resolve_hub_commit(repo_id, what="--model"):
    """The commit of a hub id that the model will load: the hub's current one, or the cached one when the hub
    cannot be reached (then this process stays offline). Asks the hub once per process."""
    from huggingface_hub import constants
    commit, reason = (None, "HF_HUB_OFFLINE is set") if constants.HF_HUB_OFFLINE else ask_hub_commit(repo_id, what)
    if commit:
        return commit
    snapshot = find_cached_snapshot(repo_id)
    if snapshot is None:
        raise UserError(f"{what} {repo_id}: no such local folder; the Hugging Face hub cannot be reached ({reason}) "
                        f"and the local cache ({constants.HF_HUB_CACHE}) has no copy: download it where there is "
                        f"network (hf download {repo_id} --local-dir DIR) and pass {what} DIR")
    if not constants.HF_HUB_OFFLINE:
        print(f"the Hugging Face hub cannot be reached ({reason}): using the cached {repo_id} ({snapshot})",
              file=sys.stderr, flush=True)
        stay_offline()
    return os.path.basename(snapshot)


@functools.lru_cache(maxsize=None)
def identify_checkpoint(model, on_hub=True):
    """What a --model value holds: "sha256:..." of a local file or folder, "hub:org/name@commit" of a hub id.

    on_hub False: the value is a local file or a placeholder that the captioner resolves and checks itself
    (MiniGPT-4's --model); a value that is not on disk is then its own identity."""
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return hash_contents(path)
    if not on_hub:
        return model
    if not is_hub_id(model):
        raise UserError(f"--model {model}: no such file or folder")
    return f"hub:{model}@{resolve_hub_commit(model)}"


def one_weight_format(allow_patterns, repo_files):
    """allow_patterns with one weight pattern: several (e.g. *.safetensors, *.bin) are alternatives in order of
    preference, and the first that matches a file of the repository is kept."""
    weights = [pattern for pattern in allow_patterns if pattern.endswith(WEIGHT_SUFFIXES)]
    held = next((pattern for pattern in weights if fnmatch.filter(repo_files, pattern)), weights[0])
    return [pattern for pattern in allow_patterns if pattern not in weights or pattern == held]


def fetch_folder(value, allow_patterns, what="--model"):
    """A local folder for a folder path or a hub id: the folder itself, or the hub id's snapshot in the hub cache
    with the files matching allow_patterns (glob patterns; weight patterns as in one_weight_format), downloaded
    where they are not cached. When the hub cannot be reached, the cached snapshot (resolve_hub_commit)."""
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise UserError(f"{what} {value} is a file, not a folder")
    if not is_hub_id(value):
        raise UserError(f"{what} {value} not found: not a folder, and not a Hugging Face hub id")
    commit = resolve_hub_commit(value, what)
    from huggingface_hub import constants, list_repo_files, snapshot_download
    if constants.HF_HUB_OFFLINE:
        return find_cached_snapshot(value)
    try:
        patterns = list(allow_patterns)
        if sum(pattern.endswith(WEIGHT_SUFFIXES) for pattern in patterns) > 1:
            patterns = one_weight_format(patterns, list_repo_files(value, revision=commit))
        return snapshot_download(value, revision=commit, allow_patterns=patterns)
    except Exception as error:
        raise UserError(f"{what} {value}: cannot download it from the Hugging Face hub "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def download_file(url, path, flag):
    """Fetch `url` into `path` unless it is there, as torch.hub does (a progress bar, a .partial file renamed at
    the end). The processes of one machine take turns on a lock file, so one downloads and the others find the
    file. flag: the option that names another file instead, for the message when the download fails."""
    import torch
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isfile(path):
                print(f"downloading {url} to {path}", file=sys.stderr, flush=True)
                torch.hub.download_url_to_file(url, path, progress=True)
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise UserError(f"{os.path.basename(path)} is not in {os.path.dirname(path)} and cannot be downloaded "
                        f"from {url} ({error}): download it there, or pass {flag} FILE") from None
    finally:
        socket.setdefaulttimeout(timeout)


def read_json(path, default=None):
    """A checkpoint's JSON file (config.json, tokenizer_config.json, ...), or `default` where there is none."""
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)
