"""qwen.py end to end against the model cards' one-image call (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), on tiny
checkpoints."""
import pytest
import torch
import transformers
from conftest import read_jsonl, run_command
from qwen_checkpoint import FAMILIES, make_checkpoint
from qwen_vl_utils import process_vision_info
from sample_images import write_input
from transformers import AutoProcessor

MAX_NEW_TOKENS = 12
FREE_PROMPT = "What is in the picture?"


def model_card_captioner(checkpoint, model_class, device="cpu"):
    """The model card's code for one image, greedy, with the processor's pixel limits and patch size passed to
    qwen_vl_utils (Qwen3-VL's card: image_patch_size=16, and the processor told not to resize again)."""
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = model_class.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    default_size = dict(processor.image_processor.size)
    end_tokens = model.generation_config.eos_token_id
    patch_size = processor.image_processor.patch_size

    def caption(image_path, prompt, max_pixels=None):
        size = {**default_size, **({"longest_edge": max_pixels} if max_pixels else {})}
        processor.image_processor.size = size
        messages = [{"role": "user", "content": [
            {"type": "image", "image": str(image_path), "min_pixels": size["shortest_edge"],
             "max_pixels": size["longest_edge"]},
            {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs, video_inputs = process_vision_info(messages, image_patch_size=patch_size)
        resize = {} if patch_size == 14 else {"do_resize": False}
        inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt",
                           **resize).to(device)
        generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new_tokens = generated[0, inputs.input_ids.shape[1]:]
        answer = processor.batch_decode([new_tokens], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        return answer, not any(int(t) in end_tokens for t in new_tokens)

    return caption


@pytest.fixture(scope="module")
def model_card_caption(qwen_checkpoint):
    return model_card_captioner(qwen_checkpoint, transformers.Qwen2VLForConditionalGeneration)


def test_batched_captions_equal_model_card_and_broken_entries_are_recorded(
        qwen_checkpoint, image_folder, model_card_caption, tmp_path):
    folder, good, broken = image_folder
    entries = [name for pair in zip(good, broken + [None] * len(good)) for name in pair if name]
    input_file = write_input(folder / "mixed.jsonl", entries, jsonl=True, extra=lambda i: {"row": i})
    out = tmp_path / "out"
    run_command(["bash", "generate.sh", str(input_file), "qwen", "--model", qwen_checkpoint, "--output-dir", str(out),
                 "--batch-size", "4", "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", "0",
                 "--prompt", "default", "--prompt", FREE_PROMPT, "--num-workers", "2"])

    model_dir = out / "qwen" / "tiny-qwen2-vl"
    prompt_dirs = {"Describe the image in detail:": model_dir / "default"}
    prompt_dirs[FREE_PROMPT] = next(p for p in model_dir.iterdir() if p.name.startswith("custom-"))
    truncated_seen = set()
    for prompt, prompt_dir in prompt_dirs.items():
        rows = read_jsonl(prompt_dir / "captions-00000-of-00001.jsonl")
        assert sorted(row["image"] for row in rows) == sorted(good)
        for row in rows:
            expected, truncated = model_card_caption(folder / row["image"], prompt)
            assert row["caption"] == expected, (row["image"], prompt)
            assert row["truncated"] == truncated
            assert row["row"] == entries.index(row["image"])
            assert row["prompt"] == prompt_dir.name and row["model"] == qwen_checkpoint
            truncated_seen.add(truncated)

    errors = {row["image"]: row["error"] for row in read_jsonl(model_dir / "errors-00000-of-00001.jsonl")}
    assert set(errors) == set(broken)
    assert errors["missing.jpg"] == "file not found"
    assert errors["empty.jpg"] == "empty file"
    assert errors["not-an-image.jpg"] == "not an image file"
    assert "decompression bomb" in errors["bomb.png"]
    assert "directory" in errors["a-directory.jpg"]
    assert errors["truncated.jpg"].startswith("cannot decode")


def test_lowered_pixel_budget_reaches_qwen_vl_utils_and_processor(
        qwen_checkpoint, image_folder, model_card_caption, tmp_path):
    folder, _, _ = image_folder
    images = ["wide.png", "tall.png", "square.jpg"]
    out = tmp_path / "out"
    run_command(["python", "qwen.py", "--input-json", str(write_input(folder / "budget.json", images)),
                 "--model", qwen_checkpoint, "--output-dir", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS),
                 "--temperature", "0", "--max-pixels", "3136", "--num-workers", "0"])
    rows = read_jsonl(out / "qwen" / "tiny-qwen2-vl" / "default" / "captions-00000-of-00001.jsonl")
    assert sorted(row["image"] for row in rows) == sorted(images)  # the loop sorts batches by prompt length
    for row in rows:
        expected, _ = model_card_caption(folder / row["image"], "Describe the image in detail:", max_pixels=3136)
        assert row["caption"] == expected


ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("model_type, device", [("qwen2_5_vl", "cpu"), ("qwen3_vl", "cpu"),
                                                *[pytest.param(kind, "cuda", marks=ON_GPU) for kind in FAMILIES]])
def test_each_family_gives_its_model_cards_captions(model_type, device, image_folder, tmp_path_factory, tmp_path):
    """The same script on a Qwen2.5-VL checkpoint (window attention, full-attention blocks) and a Qwen3-VL one
    (patch size 16, deepstack features), chosen by the checkpoint's model_type; batched in 3 with two prompts. On a
    GPU (float32, every family): the script's fast paths (the vision tower's packed windows and compiled rotary
    embedding, the compiled prefill, CUDA graphs) against the model card's plain transformers there."""
    checkpoint = make_checkpoint(str(tmp_path_factory.mktemp(f"tiny-{model_type}")), model_type=model_type)
    folder, good, _ = image_folder
    out = tmp_path / "out"
    gpu = {"env": {"CUDA_VISIBLE_DEVICES": "0"}} if device == "cuda" else {}
    run_command(["python", "qwen.py", "--input-json", str(write_input(folder / "good.json", good)), "--model",
                 checkpoint, "--output-dir", str(out), "--batch-size", "3", "--max-new-tokens", str(MAX_NEW_TOKENS),
                 "--temperature", "0", "--prompt", "default", "--prompt", FREE_PROMPT, "--num-workers", "1",
                 "--dtype", "float32"], **gpu)
    caption = model_card_captioner(checkpoint, getattr(transformers, FAMILIES[model_type][1].__name__), device)
    rows = [row for path in sorted(out.glob("qwen/*/*/captions-*.jsonl")) for row in read_jsonl(path)]
    assert len(rows) == 2 * len(good)
    prompts = {"default": "Describe the image in detail:"}
    for row in rows:
        expected, truncated = caption(folder / row["image"], prompts.get(row["prompt"], FREE_PROMPT))
        assert (row["caption"], row["truncated"]) == (expected, truncated), (row["image"], row["prompt"])


@ON_GPU
def test_the_vision_towers_fast_paths_compute_transformers_features_on_the_gpu(qwen_checkpoint):
    """Qwen2-VL's vision tower with qwen.VisionAttention, then with the prefill compiled too, against transformers'
    own, float32 on the GPU: equal eager, and within float32 rounding compiled (Inductor sums in its own order).
    The end-to-end case's greedy tokens survive a 1% error in the vision attention on the tiny checkpoint; this
    test does not (its query or its output scaled by 1.01 moves the features by about 1e-3 of their largest)."""
    import qwen
    from utils.generation.compiled_prefill import compile_prefill
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        qwen_checkpoint, dtype=torch.float32, attn_implementation="sdpa").to("cuda").eval()
    generator = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 8, 8], [1, 6, 4], [1, 2, 10]], device="cuda")
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=generator).to("cuda")
    with torch.inference_mode():
        reference = model.model.visual(pixels, grid_thw=grid).pooler_output
        qwen.replace_vision_attention(model.model.visual)
        assert torch.equal(model.model.visual(pixels, grid_thw=grid).pooler_output, reference)
        compile_prefill(model, wait=True)
        compiled = model.model.visual(pixels, grid_thw=grid).pooler_output
    torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


def test_the_vision_rotary_embedding_compiled_in_the_background_computes_eagers_query_key_and_value():
    """qwen.rotated_qkv as VisionAttention runs it once compile_prefill turns its compile on: eager while the
    compile of an example with sizes of its own runs, then that one code at every number of patches (float32, the
    tests' tiny vision tower's 4 heads of 8)."""
    import qwen
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from utils.generation.compiled_prefill import compiled, run_compiled

    def arguments(patches):
        return (torch.randn(patches, 3 * 32), torch.randn(patches, 8), torch.randn(patches, 8), 4,
                apply_rotary_pos_emb_vision)
    first = arguments(5)
    with torch.inference_mode():
        assert all(map(torch.equal, run_compiled(qwen.rotated_qkv, first, wait=False), qwen.rotated_qkv(*first)))
        assert compiled(qwen.rotated_qkv).ready.wait(600)
        graphs = dict(torch._dynamo.utils.counters["stats"])
        for patches in (3, 700):
            args = arguments(patches)
            assert all(map(torch.equal, run_compiled(qwen.rotated_qkv, args, wait=False), qwen.rotated_qkv(*args)))
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # nothing compiled again


def test_a_checkpoint_of_another_family_is_refused_in_one_line(tmp_path):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    result = run_command(["python", "qwen.py", "--input-json", "examples/input.json", "--model",
                          str(tmp_path / "llava"), "--output-dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip() == (f"qwen.py: error: {tmp_path / 'llava'}: model_type 'llava' is not one of "
                                     "qwen.py's: qwen2_vl, qwen2_5_vl, qwen3_vl")
