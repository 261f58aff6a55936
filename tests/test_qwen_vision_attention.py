"""On a GPU: Qwen2-VL's vision attention packed into one varlen call per layer (qwen.py, utils/attention.py)
against transformers' image-by-image path, on the tiny checkpoint. Skipped without CUDA; run on the
device with `python3 -m pytest tests/test_qwen_vision_attention.py`."""
import pytest
import torch
from conftest import read_jsonl, run_command
from sample_images import write_input

from qwen import QwenCaptioner
from utils.captioning import build_parser
from utils.images import open_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention runs only on a GPU")

# 256 to 1024 patches an image: several 128-token blocks of the attention kernels per image.
PIXELS = ["--min-pixels", str(28 * 28 * 64), "--max-pixels", str(28 * 28 * 256)]
# Packed and per-image attention sum in different orders; in half precision the vision features may then
# differ by a few units in the last place (bfloat16 keeps 8 bits): allowed 2% of the largest feature value.
HALF_PRECISION_TOLERANCE = 0.02


def vision_features(checkpoint, paths, dtype, flags=()):
    """The vision tower's output for all images in one call, as qwen.py sets it up, and the attention
    calls it made: (features, varlen calls, SDPA calls)."""
    args = build_parser(QwenCaptioner).parse_args(["--input-json", "unused", "--model", checkpoint, *PIXELS, *flags])
    args.dtype = dtype
    captioner = QwenCaptioner(args, torch.device("cuda"))
    prepared = [captioner.prepare(open_image(path)) for path in paths]
    pixel_values = torch.cat([image.pixel_values for image in prepared]).cuda()
    grid = torch.cat([image.grid_thw for image in prepared]).cuda()
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        features = torch.cat(captioner.model.get_image_features(pixel_values, grid).pooler_output)
    names = [event.name for event in profile.events()]
    return features.float(), names.count("torch_attn::_varlen_attn"), names.count("aten::scaled_dot_product_attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_packed_vision_features_equal_per_image_features(qwen_checkpoint, image_folder, dtype):
    folder, good, _ = image_folder
    paths = [folder / name for name in good]
    layers = 2  # the tiny checkpoint's vision depth
    per_image, varlen_calls, sdpa_calls = vision_features(qwen_checkpoint, paths, dtype, ["--no-packed-vision"])
    assert (varlen_calls, sdpa_calls) == (0, layers * len(paths))
    packed, varlen_calls, sdpa_calls = vision_features(qwen_checkpoint, paths, dtype)
    if dtype == torch.float32:  # varlen_attn has no float32 kernel: the per-image path, bit for bit
        assert (varlen_calls, sdpa_calls) == (0, layers * len(paths))
        assert torch.equal(packed, per_image)
    else:
        assert (varlen_calls, sdpa_calls) == (layers, 0)
        torch.testing.assert_close(packed, per_image, rtol=0, atol=HALF_PRECISION_TOLERANCE * per_image.abs().max())


def captions(checkpoint, folder, input_file, out, *flags):
    """qwen.py on the GPU: (its line about the vision attention, sorted caption rows)."""
    result = run_command(["python", "qwen.py", "--input-json", str(input_file), "--image-root", str(folder),
                          "--model", checkpoint, "--output-dir", str(out), "--temperature", "0",
                          "--max-new-tokens", "12", "--batch-size", "5", "--num-workers", "1", *PIXELS, *flags],
                         env={"CUDA_VISIBLE_DEVICES": "0"})
    line = next(line for line in result.stderr.splitlines() if "vision attention" in line)
    rows = [row for path in out.glob("qwen/*/default/captions-*.jsonl") for row in read_jsonl(path)]
    return line, sorted((row["image"], row["caption"], row["truncated"]) for row in rows)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_packed_vision_gives_the_per_image_captions(qwen_checkpoint, image_folder, tmp_path, dtype):
    folder, good, _ = image_folder
    input_file = write_input(tmp_path / "input.json", good)
    line, packed = captions(qwen_checkpoint, folder, input_file, tmp_path / "packed", "--dtype", dtype)
    per_image_line, per_image = captions(qwen_checkpoint, folder, input_file, tmp_path / "per-image",
                                         "--dtype", dtype, "--no-packed-vision")
    assert "vision attention image by image (--no-packed-vision)" in per_image_line
    if dtype == "float32":
        assert "image by image: packed varlen attention needs float16 or bfloat16, not float32" in line
    else:
        assert "vision attention packed: one varlen attention call per layer" in line
    assert len(packed) == len(good)
    assert packed == per_image
