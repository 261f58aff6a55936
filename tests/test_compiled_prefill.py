"""utils/generation/compiled_prefill.py's default: the prefill runs eagerly until the background compile is done,
then compiled, with the same tokens. On the GPU where there is one, else on the CPU (inductor's C++ code)."""
import fcntl
import json
import subprocess
import sys
import threading

import pytest
import torch

from conftest import REPO, command_env, tiny_llama
from utils.generation import compiled_prefill
from utils.generation.cuda_graphs import decode_with_cuda_graphs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_prefill_is_eager_until_the_background_compile_is_done(tmp_path, monkeypatch):
    """The first prefill starts the compile on its thread (under the lock file in inductor's cache folder) and runs
    eagerly; once the code is ready the prefill runs it; every call gives eager generate()'s tokens (float32)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = tiny_llama(DEVICE)
    ids = torch.randint(1, 48, (4, 6), device=DEVICE)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                  pad_token_id=0)
    with torch.inference_mode():
        plain = model.generate(**kwargs)
        compiled_prefill.compile_prefill(model)
        before = compiled_prefill.PREFILL_CALLS.copy()
        assert torch.equal(model.generate(**kwargs), plain)
        assert compiled_prefill.PREFILL_CALLS["eager"] > before["eager"]
        codes = {compiled_prefill.compiled(module.forward.forward) for module in model.modules()
                 if isinstance(module.__dict__.get("forward"), compiled_prefill.PrefillForward)}
        assert len(codes) == 2 and all(code.ready.wait(600) for code in codes)  # RMSNorm, MLP
        middle, graphs = compiled_prefill.PREFILL_CALLS.copy(), dict(torch._dynamo.utils.counters["stats"])
        longer = torch.randint(1, 48, (3, 11), device=DEVICE)  # other sizes: the same code, no recompile
        expected = model.generate(input_ids=longer, attention_mask=torch.ones_like(longer), do_sample=False,
                                  max_new_tokens=4, pad_token_id=0)
        assert torch.equal(model.generate(**kwargs), plain)
        # Called while an FX trace is under way (torch 2.11 tells every thread so while the compile thread traces
        # a graph), compiled code runs eagerly instead of raising.
        norm, hidden, outputs = model.model.norm, torch.randn(2, 5, 32, device=DEVICE), []
        ModulesRunAsTheyAre().trace(lambda: outputs.append(norm(hidden)))
        assert torch.equal(outputs[0], type(norm).forward(norm, hidden))
    assert compiled_prefill.PREFILL_CALLS["compiled"] > middle["compiled"]
    assert compiled_prefill.PREFILL_CALLS["eager"] == middle["eager"]
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # nothing compiled again
    assert (tmp_path / "inductor" / "compile.lock").is_file()
    assert len(list((tmp_path / "inductor").glob("compiled-*"))) == 2  # RMSNorm's graphs, the MLP's
    compiled_prefill.eager_forwards(model)
    assert torch.equal(model.generate(input_ids=longer, attention_mask=torch.ones_like(longer), do_sample=False,
                                      max_new_tokens=4, pad_token_id=0), expected)


def test_the_loop_compiles_before_its_first_batch(qwen_checkpoint, tmp_path, monkeypatch):
    """The loop's compile_before_first_batch: a blank image starts the compile of every compiled module, and the call
    returns once they are all done, so that the first batch runs compiled; the blank image's calls are not counted,
    and its sampling leaves the random generator where it was."""
    import qwen
    from conftest import model_settings
    from PIL import Image

    from utils.caption_loop import compile_before_first_batch
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    captioner = qwen.QwenCaptioner(model_settings(qwen.QwenCaptioner, "--model", qwen_checkpoint, "--max-new-tokens",
                                                  "4", "--temperature", "1"), torch.device(DEVICE))
    assert compiled_prefill.compile_prefill(captioner.model) > 0
    prompts = {"default": qwen.QwenCaptioner.prompts["default"]}
    with torch.inference_mode():
        compile_before_first_batch(captioner, prompts)
        assert not compiled_prefill.PREFILL_CALLS
        image = captioner.prepare(Image.new("RGB", (64, 48), "red"))
        captioner.caption([image, image], list(prompts.values()))
        assert compiled_prefill.PREFILL_CALLS["compiled"] > 0 and compiled_prefill.PREFILL_CALLS["eager"] == 0
        # (checked with the code compiled: a compile restores the generator's state as it found it)
        generator = torch.get_rng_state(), torch.cuda.get_rng_state() if DEVICE == "cuda" else None
        compile_before_first_batch(captioner, prompts)
    assert torch.equal(torch.get_rng_state(), generator[0])
    assert DEVICE == "cpu" or torch.equal(torch.cuda.get_rng_state(), generator[1])


class ModulesRunAsTheyAre(torch.fx.Tracer):
    """An FX trace that runs the modules it meets, as the one inductor's compile makes."""

    def call_module(self, module, forward, args, kwargs):
        return forward(*args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_decode_step_is_recorded_while_a_compile_runs():
    """A compile on the compile thread synchronizes the device, which a recording on another thread does not
    survive: while one runs (compiled_prefill.COMPILING held), decode steps run eagerly, and once it is done the
    next call records and replays; the same tokens throughout."""
    model = tiny_llama("cuda")
    ids = torch.randint(1, 48, (4, 6), device="cuda")
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                  pad_token_id=0)
    with torch.inference_mode():
        plain = model.generate(**kwargs)
        [step] = decode_with_cuda_graphs(model)
        with compiled_prefill.COMPILING:
            assert torch.equal(model.generate(**kwargs), plain)
        assert step.replays == 0 and not step.recording_failed
        assert torch.equal(model.generate(**kwargs), plain)
    assert step.replays > 0


COMPILE_AND_COUNT = """
import json, sys
sys.path.insert(0, "tests")
import torch
from conftest import tiny_llama
from utils.generation import compiled_prefill
model = tiny_llama("cpu")
compiled_prefill.compile_prefill(model)
with torch.inference_mode():
    model(input_ids=torch.ones(2, 5, dtype=torch.long))  # the first prefill: the compiles start
    codes = {compiled_prefill.compiled(module.forward.forward) for module in model.modules()
             if isinstance(module.__dict__.get("forward"), compiled_prefill.PrefillForward)}
    assert all(code.ready.wait(600) for code in codes)
print(json.dumps(dict(torch._dynamo.utils.counters["inductor"])))
"""


def test_two_processes_with_one_cache_folder_compile_each_graph_once(tmp_path):
    """Two processes of a node started at once, one inductor cache folder: they take turns through its lock file,
    so each of the two graphs (RMSNorm, MLP) is compiled by one of them and loaded from the cache by the other."""
    env = command_env({"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    processes = [subprocess.Popen([sys.executable, "-c", COMPILE_AND_COUNT], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    counts = [json.loads(process.communicate(timeout=600)[0].splitlines()[-1]) for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert sum(count.get("fxgraph_cache_miss", 0) for count in counts) == 2, counts
    assert sum(count.get("fxgraph_cache_hit", 0) for count in counts) == 2, counts


def compile_turn_beside_a_holder(folder, key, holder_compiles_it=False):
    """compile_turn(key) on a thread while another open file (as another process would) holds the folder's lock,
    released after two seconds or once the turn began; whether the turn waited for it, and whether the lock was free
    inside the turn (known only where it waited: else the holder may not have let go yet). `holder_compiles_it`: the
    holder writes the key's marker before it lets go."""
    entered, lock_free_inside = threading.Event(), []

    def turn():
        with compiled_prefill.compile_turn(key), open(folder / "compile.lock", "a") as probe:
            entered.set()
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock_free_inside.append(True)
            except BlockingIOError:
                lock_free_inside.append(False)
    with open(folder / "compile.lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        thread = threading.Thread(target=turn)
        thread.start()
        waited = not entered.wait(2)
        if holder_compiles_it:
            (folder / f"compiled-{key}").touch()
    thread.join(10)
    return waited, lock_free_inside[0]


def test_only_graphs_that_nothing_marks_compiled_wait_for_the_cache_folders_lock(tmp_path, monkeypatch):
    """compile_turn: graphs no process has compiled wait for the lock and hold it while they compile, then are
    marked; marked ones (their kernels in the cache) load at once, beside the other processes; a turn that got the
    lock after the process before it compiled the same graphs lets it go; a failed compile marks nothing."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert compile_turn_beside_a_holder(tmp_path, "norm") == (True, False)
    assert (tmp_path / "compiled-norm").is_file()
    assert compile_turn_beside_a_holder(tmp_path, "norm")[0] is False
    assert compile_turn_beside_a_holder(tmp_path, "mlp", holder_compiles_it=True) == (True, True)
    with pytest.raises(RuntimeError), compiled_prefill.compile_turn("vision"):
        raise RuntimeError("inductor failed")
    assert not (tmp_path / "compiled-vision").exists()
