import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers: checkpoints and sample images
REPO = Path(__file__).resolve().parents[1]


def command_env(extra):
    """The environment the project's commands run in here: on the CPU, with this interpreter; a variable that
    `extra` gives as None is left out."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "PYTHON": sys.executable,
           **extra}
    return {name: value for name, value in env.items() if value is not None}


def run_command(args, check=True, **kwargs):
    """Run a project command from the repository root as a user would, returning the finished process."""
    env = command_env(kwargs.pop("env", {}))
    args = [sys.executable if arg == "python" and i == 0 else arg for i, arg in enumerate(args)]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate_qwen(checkpoint, input_file, out, *extra, max_new_tokens=6):
    """bash generate.sh INPUT qwen on a tiny checkpoint: greedy, images read in the main process."""
    return ["bash", "generate.sh", str(input_file), "qwen", "--model", checkpoint, "--output-dir", str(out),
            "--max-new-tokens", str(max_new_tokens), "--temperature", "0", "--num-workers", "0", *extra]


def qwen_caption_files(out):
    """{file name: its rows} of every captions file of the default prompt under out."""
    return {path.name: read_jsonl(path) for path in sorted(Path(out).glob("qwen/*/default/captions-*.jsonl"))}


def qwen_captions(out):
    """(image, caption) of every line of every captions file under out, sorted; an image twice shows twice."""
    return sorted((row["image"], row["caption"]) for rows in qwen_caption_files(out).values() for row in rows)


def one_process_captions(command, count):
    """qwen_captions of one plain run of command (a generate_qwen list whose --output-dir is new), every one of the
    input's `count` images captioned: the reference that runs split across processes must equal."""
    run_command(command)
    rows = qwen_captions(command[command.index("--output-dir") + 1])
    assert len(rows) == count
    return rows


def model_settings(captioner_cls, *argv, dtype="float32"):
    """The ModelSettings that the loop builds captioner_cls with for this command line (--input-json given)."""
    from utils.caption_loop import model_settings
    from utils.command_line import build_parser
    from utils.settings import ProcessPlace, resolve_settings
    parser, own_flags = build_parser(captioner_cls)
    args = parser.parse_args(["--input-json", "unused.json", *map(str, argv)])
    return model_settings(captioner_cls, resolve_settings(captioner_cls, args, own_flags, ProcessPlace(0, 1, 0)), dtype)


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory):
    from qwen_checkpoint import make_checkpoint
    return str(make_checkpoint(tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A folder with good images and broken entries: (folder, good names, broken names)."""
    from sample_images import make_broken_entries, make_good_images
    folder = tmp_path_factory.mktemp("images")
    return folder, make_good_images(folder), make_broken_entries(folder)


def tiny_llama(device="cuda"):
    """A float32 Llama of two layers with random weights (seed 0)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(config).to(device).eval()


def tokens_of_all_paths(model, prompt_ids, image_features, image_token_id, pad_token_id, **generate_kwargs):
    """{(decoding, path): new tokens} of plain generate() over the full left-padded sequences, of
    utils/generation/shared_prefix.py's shared-prefix path and of utils/generation/refill.py's refilled rows, decoding eagerly and as
    CUDA graphs (on the GPU: decode_with_cuda_graphs stays on `model`), on the GPU with the prefill compiled as the
    scripts run it there (compile_prefill, waited for, also left on `model`). With graphs, every path must decode
    through them (the shared one with its own static cache, the refill with its slots)."""
    import torch
    from utils.generation import shared_prefix
    from utils.generation.compiled_prefill import compile_prefill
    from utils.generation.cuda_graphs import decode_with_cuda_graphs
    # utils/generation/refill.py: the rows of about half the images at a time, refilled as captions end
    refill = functools.partial(shared_prefix.generate, decode_rows=sum(map(len, prompt_ids)) // 2)
    refill.__name__ = "refill"
    tokens = {}
    for mode in ("eager", "graphs"):
        steps = decode_with_cuda_graphs(model) if mode == "graphs" else []
        if mode == "graphs" and model.device.type == "cuda":
            compile_prefill(model, wait=True)
        for path in (shared_prefix.generate_left_padded, shared_prefix.generate_with_shared_prefix, refill):
            replays = sum(step.replays for step in steps)
            with torch.inference_mode():
                tokens[mode, path.__name__] = path(model, prompt_ids, image_features, image_token_id, pad_token_id,
                                                   **generate_kwargs).tolist()
            assert mode == "eager" or sum(step.replays for step in steps) > replays, path.__name__
        assert all(not step.recording_failed for step in steps)
    return tokens
