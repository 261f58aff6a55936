"""llava.py on tiny random-weight checkpoints in both formats (see tests/llava_checkpoint.py)."""
import json
import pickle

import numpy as np
import pytest
import sentencepiece
import torch
from PIL import Image

import llava
from conftest import model_settings, tokens_of_all_paths
from llava_checkpoint import CLIP_MEAN, CLIP_STD, build_checkpoints
from utils.checkpoints import one_weight_format
from utils.command_line import build_parser
from utils.errors import UserError
from utils.images import open_image

LLAVA_V1_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions. USER: <image>\n{} ASSISTANT:")
PROMPTS = ["Describe the image.", llava.LlavaCaptioner.prompts["default"]]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    # the original config names the published tower, so loading it needs --vision-tower, as offline users do
    return build_checkpoints(tmp_path_factory.mktemp("llava"))


def make_settings(model, vision_tower=None, *flags):
    """The script's own flags, greedy, float32 (the loop resolves --dtype before building the captioner)."""
    return model_settings(llava.LlavaCaptioner, "--model", model, "--temperature", "0", "--max-new-tokens", "20",
                          *(["--vision-tower", vision_tower] if vision_tower else []), *flags)


@pytest.fixture(scope="session")
def captioners(checkpoints):
    cpu = torch.device("cpu")
    return {"hf": llava.LlavaCaptioner(make_settings(checkpoints.hf), cpu),
            "original": llava.LlavaCaptioner(make_settings(checkpoints.original, checkpoints.vision_tower), cpu)}


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    noise = lambda h, w, *c: rng.integers(0, 256, (h, w, *c), dtype=np.uint8)
    return [Image.new("RGB", (60, 40), "red"), Image.fromarray(noise(80, 50, 3)),
            Image.fromarray(noise(300, 200), "L"), Image.fromarray(noise(100, 400, 4), "RGBA"),
            Image.fromarray(noise(336, 336, 3)).convert("P"), Image.new("RGB", (30, 90), "blue")]


def sentencepiece_ids(checkpoints, text):
    return sentencepiece.SentencePieceProcessor(model_file=str(checkpoints.original / "tokenizer.model")).encode(text)


@pytest.mark.parametrize("form", ["hf", "original"])
def test_prompt_ids_are_tokenizer_image_token_of_llava_v1(form, captioners, checkpoints):
    captioner = captioners[form]
    before, after = llava.split_prompt("Describe the image.")
    assert before + "<image>" + after == LLAVA_V1_PROMPT.format("Describe the image.")
    bos = captioner.tokenizer.bos_token_id
    expected = ([bos] + sentencepiece_ids(checkpoints, before) + [captioner.image_token_id] * 576
                + sentencepiece_ids(checkpoints, after))
    ids = captioner.prompt_ids("Describe the image.")
    assert ids == expected
    # the text after the image starts with the dummy-prefix piece, then the newline byte
    after_ids = ids[ids.index(captioner.image_token_id) + 576:]
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(checkpoints.original / "tokenizer.model"))
    assert [pieces.id_to_piece(i) for i in after_ids[:2]] == ["▁", "<0x0A>"]
    assert ids.count(bos) == 1


def test_image_token_ids(captioners, checkpoints):
    hf_config = json.loads((checkpoints.hf / "config.json").read_text())
    assert captioners["hf"].image_token_id == hf_config["image_token_index"]
    assert captioners["hf"].image_token_id == captioners["hf"].tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = json.loads((checkpoints.original / "config.json").read_text())["vocab_size"]
    assert captioners["original"].image_token_id == vocab_size  # one past the original vocabulary
    assert captioners["original"].generation["suppress_tokens"] == [vocab_size]
    assert "suppress_tokens" not in captioners["hf"].generation


def test_image_tag_inside_question():
    _, after = llava.split_prompt("Describe the <image> in English in detail:")
    assert after == "\nDescribe the image in English in detail: ASSISTANT:"
    assert llava.split_prompt("<image>\nWhat is this?") == llava.split_prompt("What is this?")
    assert llava.split_prompt("What is this? <image>") == llava.split_prompt("What is this?")


def normalized(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


@pytest.mark.parametrize("form", ["hf", "original"])
def test_non_square_images_are_padded_not_cropped(form, captioners):
    # 3:1 image, red left edge, blue right edge: center-cropping would keep neither edge
    wide = Image.new("RGB", (300, 100), (0, 255, 0))
    wide.paste((255, 0, 0), (0, 0, 30, 100))
    wide.paste((0, 0, 255), (270, 0, 300, 100))
    pixels = captioners[form].prepare(wide)
    assert pixels.shape == (3, 336, 336)
    fill = normalized((122, 116, 104))  # int(mean * 255), LLaVA's expand2square colour
    assert torch.allclose(pixels[:, 168, 5], normalized((255, 0, 0)), atol=0.05)
    assert torch.allclose(pixels[:, 168, 330], normalized((0, 0, 255)), atol=0.05)
    assert torch.allclose(pixels[:, 5, 168], fill, atol=0.01)
    assert torch.allclose(pixels[:, 330, 168], fill, atol=0.01)
    tall = wide.transpose(Image.Transpose.ROTATE_90)
    pixels = captioners[form].prepare(tall)
    assert torch.allclose(pixels[:, 168, 5], fill, atol=0.01)
    assert torch.allclose(pixels[:, 5, 168], normalized((0, 0, 255)), atol=0.05)


def test_prepare_converts_to_rgb_first_and_pickles(captioners, images):
    prepare = captioners["hf"].prepare
    in_worker = pickle.loads(pickle.dumps(prepare))  # DataLoader workers get it pickled
    for image in images:
        assert torch.equal(prepare(image), prepare(image.convert("RGB")))
        assert torch.equal(in_worker(image), prepare(image))


def caption_one_by_one(captioner, images):
    return [[captioner.caption([captioner.prepare(image)], [prompt])[0][0] for prompt in PROMPTS] for image in images]


@pytest.fixture(scope="session")
def one_by_one(captioners, images):
    return {form: caption_one_by_one(captioner, images) for form, captioner in captioners.items()}


def test_both_formats_give_identical_captions(one_by_one):
    assert one_by_one["hf"] == one_by_one["original"]
    captions = [c for per_image in one_by_one["hf"] for c in per_image]
    assert len({c.text for c in captions}) >= 6, "random captions should depend on image and prompt"
    assert {c.truncated for c in captions} == {True, False}, "some captions should stop at EOS, some not"


@pytest.mark.parametrize("form", ["hf", "original"])
def test_batched_equals_one_by_one(form, captioners, images, one_by_one):
    captioner = captioners[form]
    batched = captioner.caption([captioner.prepare(image) for image in images], PROMPTS)
    assert batched == one_by_one[form]


@pytest.mark.parametrize("form", ["hf", "original"])
def test_several_prompts_prefill_their_shared_prefix_once(form, captioners, images, one_by_one):
    """Prompts of different question lengths in one caption(): each image's tokens before the question (system
    text, 576 image tokens) are prefilled once (utils/generation/shared_prefix.py), and every caption is the one of
    that prompt alone."""
    captioner = captioners[form]
    prompts = [PROMPTS[1], "What?", PROMPTS[0]]
    assert len({len(captioner.prompt_ids(prompt)) for prompt in prompts}) == 3
    expected = [[one_by_one[form][i][1], captioner.caption([captioner.prepare(image)], ["What?"])[0][0],
                 one_by_one[form][i][0]] for i, image in enumerate(images[:3])]
    prefills = []  # (sequences, tokens) of every language-model call that is not a decode step
    hook = captioner.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(tuple(kwargs["inputs_embeds"].shape[:2]))
        if kwargs["inputs_embeds"].shape[1] > 1 else None, with_kwargs=True)
    try:
        batched = captioner.caption([captioner.prepare(image) for image in images[:3]], prompts)
    finally:
        hook.remove()
    assert len(prefills) == 2 and prefills[0][0] == 3 and prefills[0][1] > 576
    assert prefills[1][0] == 9 and prefills[1][1] < 30
    assert batched == expected


@pytest.mark.parametrize("form", ["hf", "original"])
def test_refilled_rows_equal_one_by_one(form, captioners, images, one_by_one):
    """--decode-rows 4 (utils/generation/refill.py): 3 images x 2 prompts decode in 4 rows that take the next image's
    rows as captions end; the original form also keeps its image token out (a transformers processor the refill
    applies)."""
    captioner = captioners[form]
    captioner.decode_rows = 4
    try:
        refilled = captioner.caption([captioner.prepare(image) for image in images[:3]], [PROMPTS[1], PROMPTS[0]])
    finally:
        captioner.decode_rows = None
    assert refilled == [[one_by_one[form][i][1], one_by_one[form][i][0]] for i in range(3)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("form", ["hf", "original"])
def test_shared_prefix_gives_the_tokens_of_plain_generate_on_gpu(form, checkpoints, images):
    """float32 on the GPU, the default attention: the shared-prefix path and plain generate() over the full
    left-padded sequences give the same tokens, decoding eagerly and as CUDA graphs (with the prefill compiled)."""
    model, vision_tower = (checkpoints.hf, None) if form == "hf" else (checkpoints.original, checkpoints.vision_tower)
    captioner = llava.LlavaCaptioner(make_settings(model, vision_tower), torch.device("cuda"))
    ids = [[captioner.prompt_ids(prompt) for prompt in [PROMPTS[1], "What?", PROMPTS[0]]]] * len(images)
    with torch.inference_mode():
        features = captioner.image_features(torch.stack([captioner.prepare(image) for image in images]))
    tokens = tokens_of_all_paths(captioner.model, ids, features, captioner.image_token_id, captioner.pad_token_id,
                                  eos_token_id=captioner.tokenizer.eos_token_id, **captioner.generation)
    assert len({str(rows) for rows in tokens.values()}) == 1, tokens
    assert len(tokens["eager", "generate_left_padded"]) == 3 * len(images)


def test_left_padded_mixed_prompts_equal_one_by_one(captioners, images):
    captioner = captioners["original"]
    pixels = torch.stack([captioner.prepare(image) for image in images[:3]])
    id_lists = [captioner.prompt_ids(p) for p in ["Describe the image.", "What?", PROMPTS[1]]]
    assert len({len(ids) for ids in id_lists}) == 3
    batched = captioner.generate(pixels, [[ids] for ids in id_lists])
    assert batched == [captioner.generate(pixels[i:i + 1], [[ids]])[0] for i, ids in enumerate(id_lists)]


def test_default_decoding_is_the_original_scripts_sampling_at_temperature_0_2():
    parser, _ = build_parser(llava.LlavaCaptioner)
    args = parser.parse_args(["--input-json", "in.json"])
    assert args.model == "liuhaotian/llava-v1.5-13b" and args.batch_size == 8
    kwargs = model_settings(llava.LlavaCaptioner).decoding.generate_kwargs()
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.2 and kwargs["num_beams"] == 1
    assert "top_p" not in kwargs and kwargs["max_new_tokens"] == 77


def test_a_hub_id_is_fetched_in_one_weight_format():
    """safetensors where the repository has them, else its PyTorch pickles, as from_pretrained would load them."""
    assert one_weight_format(llava.CHECKPOINT_FILES, ["config.json", "model.safetensors", "pytorch_model.bin"]) == [
        "*.json", "tokenizer.model", "*.safetensors"]
    assert one_weight_format(llava.CHECKPOINT_FILES, ["config.json", "pytorch_model-00001-of-00003.bin"]) == [
        "*.json", "tokenizer.model", "*.bin"]


def test_user_errors_are_one_line(checkpoints, tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="not a folder"):
        llava.LlavaCaptioner(make_settings(tmp_path / "missing"), cpu)
    with pytest.raises(UserError, match="no config.json"):
        llava.LlavaCaptioner(make_settings(tmp_path), cpu)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="neither"):
        llava.LlavaCaptioner(make_settings(tmp_path), cpu)
    config = json.loads((checkpoints.original / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(UserError, match="mm_projector_type"):
        llava.LlavaCaptioner(make_settings(tmp_path, checkpoints.vision_tower), cpu)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v for f in checkpoints.original.glob("pytorch_model-*.bin") for k, v in torch.load(f).items()}
    del state["model.mm_projector.2.bias"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights do not match"):
        llava.LlavaCaptioner(make_settings(tmp_path, checkpoints.vision_tower), cpu)
    with pytest.raises(UserError, match="--vision-tower"):
        llava.LlavaCaptioner(make_settings(checkpoints.hf, checkpoints.vision_tower), cpu)


def reference_caption(model, tokenizer, image_processor, pieces, image, question, max_new_tokens):
    """One image as LLaVA-1.5's own inference runs it, written out here without llava.py: RGB, pad to
    square with int(mean * 255), CLIP processor, llava_v1 prompt split at <image>, pieces tokenized apart."""
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    pixel_values = image_processor(images=square, return_tensors="pt")["pixel_values"]
    before, after = LLAVA_V1_PROMPT.format(question).split("<image>")
    ids = [tokenizer.bos_token_id, *pieces.encode(before), *[model.config.image_token_id] * 576, *pieces.encode(after)]
    output = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values, do_sample=False,
                            max_new_tokens=max_new_tokens)
    new_tokens = output[0, len(ids):]
    return (tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
            tokenizer.eos_token_id not in new_tokens.tolist())


@pytest.fixture(scope="module")
def reference_captions(checkpoints, image_folder):
    """{image name: (caption, truncated)} for the good sample images, from the llava-hf checkpoint
    (an original checkpoint must give the same captions)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(checkpoints.hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoints.hf)
    image_processor = CLIPImageProcessorPil.from_pretrained(checkpoints.hf)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(checkpoints.original / "tokenizer.model"))
    folder, good, _ = image_folder
    return {name: reference_caption(model, tokenizer, image_processor, pieces, open_image(str(folder / name)),
                                    "Describe the image.", 12) for name in good}


@pytest.mark.parametrize("form", ["hf", "original"])
def test_generate_sh_end_to_end_equals_one_image_reference(form, checkpoints, image_folder, reference_captions,
                                                           tmp_path):
    from conftest import read_jsonl, run_command
    from sample_images import write_input

    folder, good, broken = image_folder
    input_file = write_input(folder / f"llava-{form}.json", good + broken[:2])
    model = checkpoints.hf if form == "hf" else checkpoints.original
    extra = ["--vision-tower", str(checkpoints.vision_tower)] if form == "original" else []
    run_command(["bash", "generate.sh", str(input_file), "llava", "--model", str(model), "--temperature", "0",
                 "--max-new-tokens", "12", "--prompt", "Describe the image.", "--output-dir", str(tmp_path / "out"),
                 "--batch-size", "4", "--num-workers", "2", *extra])

    [prompt_dir] = (tmp_path / "out" / "llava" / model.name).glob("custom-*")
    rows = read_jsonl(prompt_dir / "captions-00000-of-00001.jsonl")
    assert sorted(row["image"] for row in rows) == sorted(good)
    for row in rows:
        assert (row["caption"], row["truncated"]) == reference_captions[row["image"]], row["image"]
    assert len({caption for caption, _ in reference_captions.values()}) > len(good) // 2
    errors = read_jsonl(tmp_path / "out" / "llava" / model.name / "errors-00000-of-00001.jsonl")
    assert sorted(row["image"] for row in errors) == sorted(broken[:2])


def test_user_error_is_one_line_from_the_script(tmp_path):
    from conftest import run_command
    from sample_images import write_input
    input_file = write_input(tmp_path / "in.json", ["a.jpg"])
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "ckpt").mkdir()
    result = run_command(["python", "llava.py", "--input-json", str(input_file), "--model", str(tmp_path / "ckpt"),
                          "--output-dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"llava.py: error: no config.json in {tmp_path / 'ckpt'}"
    assert "Traceback" not in result.stderr
