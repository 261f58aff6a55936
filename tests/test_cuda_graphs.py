"""On a GPU: every model script gives the same captions with its prefill compiled and its decode steps replayed as
CUDA graphs (the defaults there) as with --no-compile --no-cuda-graphs, and records a graph (no eager fallback);
generate()'s stop check read one step late, and a cache and recording kept for the next call of the same shape,
give the tokens of plain generate(); recordings go on while another thread pins memory. Skipped without CUDA; run
on the device with `python3 -m pytest tests/test_cuda_graphs.py`."""
import threading

import pytest
import torch

from conftest import read_jsonl, run_command, tiny_llama
from sample_images import write_input
from utils.generation.cuda_graphs import decode_with_cuda_graphs

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
        "qwen2_5_vl": ["qwen", "--model", str(make_checkpoint(root / "qwen2_5_vl", model_type="qwen2_5_vl"))],
        "qwen3_vl": ["qwen", "--model", str(make_checkpoint(root / "qwen3_vl", model_type="qwen3_vl"))],
        "internvl-internlm2": ["internvl", "--model", build_checkpoint(str(root / "internlm2"), "internlm2"),
                               "--prompts", "detail,noun,style", "--max-tiles", "2"],
        "internvl-qwen2": ["internvl", "--model", build_checkpoint(str(root / "qwen2"), "qwen2"), "--max-tiles", "2"],
        "llava": ["llava", "--model", str(llava.hf), "--prompt", "Describe the image."],
        "minigpt4": ["minigpt4", "--cfg-path", f"{minigpt4}/repo/eval_configs/minigpt4_eval.yaml"],
    }, {"TORCH_HOME": f"{minigpt4}/torch_home"}


@pytest.mark.parametrize("name", ["qwen", "qwen2_5_vl", "qwen3_vl", "internvl-internlm2", "internvl-qwen2", "llava",
                                  "minigpt4"])
def test_compiled_prefill_and_graphs_give_the_eager_captions(name, scripts, image_folder, tmp_path):
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
                              *(["--no-compile", "--no-cuda-graphs"] if mode == "eager" else [])],
                             # (torch set TORCHINDUCTOR_CACHE_DIR here when this process compiled)
                             env={"CUDA_VISIBLE_DEVICES": "0", "SYNTHETIC_CAPTION_CACHE": str(tmp_path / "cache"),
                                  "TORCHINDUCTOR_CACHE_DIR": None, **env})
        assert "cannot record" not in result.stderr, result.stderr
        if mode == "graphs":
            assert " RMSNorms, MLPs and vision attentions compiled for the prefill" in result.stderr, result.stderr
            assert " decode steps replayed from CUDA graphs" in result.stderr
            assert " 0 decode steps replayed" not in result.stderr, result.stderr
            assert " 0 of the prefill's module calls compiled (0 eager" not in result.stderr, result.stderr
            assert "(0 eager while compiling)" in result.stderr, result.stderr
            assert any((tmp_path / "cache" / "torchinductor").iterdir())  # the compiled kernels kept there
        rows = [row for path in sorted(out.glob("*/*/*/captions-*.jsonl")) for row in read_jsonl(path)]
        captions[mode] = sorted((row["prompt"], row["image"], row["caption"], row["truncated"]) for row in rows)
    assert len(captions["graphs"]) >= len(good)
    assert captions["graphs"] == captions["eager"]


def test_recordings_go_on_while_another_thread_pins_memory():
    """The loop's loader pins host memory on its own thread while the GPU decodes (utils/batcher.py keeps it busy):
    calls of new shapes record their decode steps meanwhile, and neither the recordings nor that thread break."""
    model = tiny_llama()
    graphs = decode_with_cuda_graphs(model)
    stop, errors, pins = threading.Event(), [], [0]

    def pin_new_memory():  # each block held: every allocation is a new cudaHostAlloc
        held = []
        try:
            while not stop.is_set():
                held.append(torch.empty(1 << 18, pin_memory=True))
                pins[0] += 1
                if len(held) == 64:
                    held.clear()
                    torch._C._host_emptyCache()
        except Exception as error:
            errors.append(error)

    pinning = threading.Thread(target=pin_new_memory, daemon=True)
    pinning.start()
    try:
        for rows in range(1, 9):
            ids = torch.arange(1, 4 * rows + 1, device="cuda").reshape(rows, 4) % 40 + 1
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                           do_sample=False, pad_token_id=0)
    finally:
        stop.set()
        pinning.join(30)
    assert not errors and pins[0] > 0
    assert not any(graph.recording_failed for graph in graphs) and sum(graph.replays for graph in graphs) >= 8 * 9


def test_stop_check_one_step_late_gives_the_tokens_of_plain_generate():
    """Rows that end at different steps, the last before max_new_tokens: decode_with_cuda_graphs' generate() reads
    its stop flag a step late, runs one forward more than plain generate() (whose tokens it drops) and returns the
    same tokens."""
    model = tiny_llama()
    input_ids = torch.randint(1, 48, (6, 5), device="cuda")
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=12,
                  pad_token_id=0)
    unended = model.generate(**kwargs)[:, 5:]
    end = sorted({unended[row, row + 1].item() for row in range(6)})  # end tokens: row r ends by step r + 1
    ends = [next(step for step, token in enumerate(row) if token in end) for row in unended.tolist()]
    assert len(set(ends)) > 2
    steps = []  # generate() runs its logits processors once per step

    def count_steps(input_ids, scores):
        steps.append(input_ids.shape[1])
        return scores

    plain = model.generate(**kwargs, eos_token_id=end, logits_processor=[count_steps])
    plain_steps = len(steps)
    decode_with_cuda_graphs(model)
    late = model.generate(**kwargs, eos_token_id=end, logits_processor=[count_steps])
    assert plain_steps == max(ends) + 1 and len(steps) - plain_steps == plain_steps + 1
    assert torch.equal(late, plain)


def test_a_call_of_the_same_shape_replays_from_its_first_decode_step():
    """generate()'s static cache outlives the call with its recording: a call of the same shape (other prompts)
    replays all its decode steps, one of another shape runs its first eagerly and records anew; every call gives the
    tokens of plain generate()."""
    model = tiny_llama()
    prompts = [torch.randint(1, 48, shape, device="cuda") for shape in [(6, 5), (6, 5), (4, 7), (6, 5)]]
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    plain = [model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs) for ids in prompts]
    step, = decode_with_cuda_graphs(model)
    replays = []
    for ids, expected in zip(prompts, plain):
        before = step.replays
        assert torch.equal(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs), expected)
        replays.append(step.replays - before)
    assert replays == [6, 7, 6, 6]  # 7 decode steps each: the first eager where the shape is new
