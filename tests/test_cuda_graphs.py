"""On a GPU: every model script gives the same captions with its decode steps replayed as CUDA graphs
(the default there) as with --no-cuda-graphs, and records a graph (no eager fallback). Skipped without
CUDA; run on the device with `python3 -m pytest tests/test_cuda_graphs.py`."""
import pytest
import torch

from conftest import read_jsonl, run_command
from sample_images import write_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """{name: the script's model flags} for a tiny checkpoint of each model and form."""
    from internvl_checkpoint import build_checkpoint
    from llava_checkpoint import build_checkpoints
    from minigpt4_checkpoint import build
    from qwen_checkpoint import make_checkpoint
    root = tmp_path_factory.mktemp("graphs")
    llava = build_checkpoints(root / "llava")
    minigpt4 = build(str(root / "minigpt4"))
    return {
        "qwen": ["qwen", "--model", str(make_checkpoint(root / "qwen"))],
        "internvl-internlm2": ["internvl", "--model", build_checkpoint(str(root / "internlm2"), "internlm2"),
                               "--prompts", "detail,noun,style", "--max-tiles", "2"],
        "internvl-qwen2": ["internvl", "--model", build_checkpoint(str(root / "qwen2"), "qwen2"), "--max-tiles", "2"],
        "llava": ["llava", "--model", str(llava.hf), "--prompt", "Describe the image."],
        "minigpt4": ["minigpt4", "--cfg-path", f"{minigpt4}/repo/eval_configs/minigpt4_eval.yaml"],
    }, {"TORCH_HOME": f"{minigpt4}/torch_home"}


@pytest.mark.parametrize("name", ["qwen", "internvl-internlm2", "internvl-qwen2", "llava", "minigpt4"])
def test_graphs_give_the_eager_captions(name, scripts, image_folder, tmp_path):
    flags, env = scripts
    script, *model_flags = flags[name]
    folder, good, _ = image_folder
    input_file = write_input(tmp_path / "input.json", good)
    captions = {}
    for mode in ("graphs", "eager"):
        out = tmp_path / mode
        result = run_command(["python", f"{script}.py", "--input-json", str(input_file), "--image-root", str(folder),
                              "--output-dir", str(out), "--temperature", "0", "--max-new-tokens", "16",
                              "--dtype", "float32", "--batch-size", "3", "--num-workers", "1", *model_flags,
                              *(["--no-cuda-graphs"] if mode == "eager" else [])],
                             env={"CUDA_VISIBLE_DEVICES": "0", **env})
        assert "cannot record" not in result.stderr, result.stderr
        if mode == "graphs":
            assert " decode steps replayed from CUDA graphs" in result.stderr
            assert " 0 decode steps replayed" not in result.stderr, result.stderr
        rows = [row for path in sorted(out.glob("*/*/*/captions-*.jsonl")) for row in read_jsonl(path)]
        captions[mode] = sorted((row["prompt"], row["image"], row["caption"], row["truncated"]) for row in rows)
    assert len(captions["graphs"]) >= len(good)
    assert captions["graphs"] == captions["eager"]
