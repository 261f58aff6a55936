"""The project's cache folder, ~/.cache/synthetic-caption (or $SYNTHETIC_CAPTION_CACHE): the checkpoints' file
digests (utils/file_hashes.py) and torch.compile's kernels."""
import os


def cache_folder():
    return os.environ.get("SYNTHETIC_CAPTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "synthetic-caption")


def share_compiled_kernels():
    """torch.compile's on-disk cache (inductor's graphs and Triton kernels) in the cache folder, unless
    $TORCHINDUCTOR_CACHE_DIR names one. Inductor's default, /tmp/torchinductor_$USER, starts empty on every fresh
    node, so each requeued job compiled again; in a home folder that the nodes share, a cluster compiles once.
    Inductor writes each entry to a temporary file and renames it, so processes and nodes may share the folder; its
    keys hold the GPU, torch and the code compiled. Torch writes its default into the variable when it is first
    asked for the folder (importing torchvision does, as minigpt4.py does before the loop starts): that value
    counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_folder(), "torchinductor")
