"""internvl.py on tiny random-weight checkpoints in the original InternVL2 format (tests/internvl_checkpoint.py).

The expected values here are written out from the original algorithms (dynamic_preprocess, the conversation
templates, the tokenizers the original loaded), not taken from internvl.py."""
import json
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torchvision.transforms as T
from PIL import Image
from tokenizers import Tokenizer
from torchvision.transforms.functional import InterpolationMode

from conftest import REPO, model_settings, read_jsonl, run_command, tokens_of_all_paths
from internvl_checkpoint import build_checkpoint

sys.path.insert(0, str(REPO))
import internvl  # noqa: E402
from convert import internvl as convert_internvl  # noqa: E402
from utils import prompts as presets  # noqa: E402
from utils.checkpoints import fetch_folder  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.generation.cuda_graphs import decode_with_cuda_graphs  # noqa: E402

SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    return {variant: build_checkpoint(str(root / variant), variant) for variant in
            ("internlm2", "internlm2-vit6b", "qwen2", "internlm2_5", "qwen2_5", "qwen3")}


def make_settings(model, max_new_tokens=8, attn_implementation="eager", decode_rows=None):
    """float32, the model's own decoding (greedy), --max-tiles 6 (the default)."""
    return model_settings(internvl.InternVLCaptioner, "--model", model, "--max-new-tokens", max_new_tokens,
                          "--attn-implementation", attn_implementation,
                          *(["--decode-rows", decode_rows] if decode_rows else []))


@pytest.fixture(scope="session")
def early_end_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl-early-end")
    return {variant: build_checkpoint(str(root / f"{variant}-early-end"), variant, early_end=True)
            for variant in ("internlm2", "qwen2")}


@pytest.fixture(scope="session")
def captioners(checkpoints):
    return {variant: internvl.InternVLCaptioner(make_settings(path), torch.device("cpu"))
            for variant, path in checkpoints.items()}


def noise_image(width, height, mode="RGB", seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


# (width, height, max_tiles) -> (columns, rows), worked out by hand from the original find_closest_aspect_ratio:
# candidates (i, j) with i*j <= max_tiles in order of area; the first smallest |w/h - i/j| wins, and an equally
# close later candidate replaces it when w*h > 0.5 * 448 * 448 * i * j.
TILE_GRIDS = [
    (448, 448, 6, (1, 1)),      # square: (2, 2) ties but the image is too small (200704 <= 401408)
    (800, 800, 6, (2, 2)),      # square, big enough for the (2, 2) tie
    (5000, 5000, 6, (2, 2)),    # huge square: (3, 3) is not allowed with 6 tiles
    (1000, 1000, 12, (3, 3)),   # ... but is with 12 (1e6 > 903168)
    (10, 10, 6, (1, 1)),        # tiny
    (640, 480, 6, (3, 2)),      # 4:3 -> 1.5 is closest
    (4000, 3000, 6, (3, 2)),    # huge 4:3
    (300, 900, 6, (1, 3)),      # tall 1:3, exact
    (600, 800, 6, (2, 3)),      # tall 3:4 -> 2/3
    (20, 5, 6, (4, 1)),         # tiny and wide 4:1
    (3000, 100, 6, (6, 1)),     # extremely wide
    (500, 400, 6, (1, 1)),      # 1.25: (1,1), (2,2), (3,2) all 0.25 away; too small for either larger grid
    (750, 600, 6, (2, 2)),      # 1.25, area 450000: (2,2) yes (> 401408), (3,2) no (<= 602112)
    (1000, 800, 6, (3, 2)),     # 1.25, area 800000: both ties taken, the last one stays
    (700, 400, 6, (2, 1)),      # 1.75: (2,1) and (3,2) both 0.25 away, too small for (3,2)
    (1400, 800, 6, (3, 2)),     # 1.75, big enough for (3,2)
    (1000, 400, 6, (3, 1)),     # 2.5: (2,1) and (3,1) both 0.5 away, 400000 > 301056 takes (3,1)
    (900, 400, 6, (2, 1)),      # 2.25: (2,1) is closer
    (1000, 1000, 1, (1, 1)),    # one tile at most
]


@pytest.mark.parametrize("width,height,max_tiles,expected", TILE_GRIDS)
def test_tile_grid(width, height, max_tiles, expected):
    assert internvl.tile_grid(width, height, max_tiles) == expected


def original_pixels(image, columns, rows):
    """The original load_image: convert('RGB'), PIL resize to the grid (bicubic default), row-major 448 crops,
    thumbnail when more than one tile, torchvision Resize/ToTensor/Normalize."""
    image = image.convert("RGB")
    resized = image.resize((448 * columns, 448 * rows))
    tiles = [resized.crop((c * 448, r * 448, (c + 1) * 448, (r + 1) * 448))
             for r in range(rows) for c in range(columns)]
    if len(tiles) > 1:
        tiles.append(image.resize((448, 448)))
    transform = T.Compose([T.Resize((448, 448), interpolation=InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torch.stack([transform(tile) for tile in tiles])


@pytest.mark.parametrize("width,height,mode,grid", [(640, 480, "RGB", (3, 2)), (300, 900, "L", (1, 3)),
                                                    (200, 200, "RGBA", (1, 1)), (1000, 400, "P", (3, 1))])
def test_prepare_image_is_pixel_identical(width, height, mode, grid):
    image = noise_image(width, height, mode)
    pixels = internvl.prepare_image(image, max_tiles=6)
    expected = original_pixels(image, *grid)
    assert pixels.shape == expected.shape
    assert torch.equal(pixels, expected)


def internlm2_query(question, tiles):
    return ("<|im_start|>system\n" + SYSTEM + "<|im_end|><|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 * tiles
            + "</img>\n" + question + "<|im_end|><|im_start|>assistant\n")


def test_internlm2_prompt_ids(checkpoints, captioners):
    folder = checkpoints["internlm2"]
    sp = spm.SentencePieceProcessor(model_file=folder + "/tokenizer.model")
    with open(folder + "/tokenizer_config.json") as f:
        ids = {t["content"]: int(i) for i, t in json.load(f)["added_tokens_decoder"].items()}
    question = presets.INTERNVL["noun"]
    # transformers' slow tokenizer splits at the added tokens and sentencepiece encodes each piece; BOS first
    expected = ([1, ids["<|im_start|>"]] + sp.encode("system\n" + SYSTEM) + [ids["<|im_end|>"], ids["<|im_start|>"]]
                + sp.encode("user\n") + [ids["<img>"]] + [ids["<IMG_CONTEXT>"]] * 256 * 3 + [ids["</img>"]]
                + sp.encode("\n" + question) + [ids["<|im_end|>"], ids["<|im_start|>"]] + sp.encode("assistant\n"))
    captioner = captioners["internlm2"]
    assert captioner.prompt_ids(question, 3) == expected
    # the chat tokens are pieces of the sentencepiece vocabulary itself
    assert sp.piece_to_id("<|im_end|>") == ids["<|im_end|>"] 
    assert captioner.end_token_ids == [ids["<|im_end|>"]]
    assert captioner.image_token_id == ids["<IMG_CONTEXT>"] == captioner.model.config.image_token_id


def test_qwen2_prompt_ids(checkpoints, captioners):
    folder = checkpoints["qwen2"]
    question = presets.INTERNVL["main"]
    query = internlm2_query(question, 2)  # Hermes-2 renders exactly like internlm2-chat
    expected = Tokenizer.from_file(folder + "/tokenizer.json").encode(query).ids  # the original's fast tokenizer
    captioner = captioners["qwen2"]
    assert captioner.prompt_ids(question, 2) == expected
    assert captioner.template["sep"] == "<|im_end|>"


def test_internlm2_decode_matches_original(checkpoints, captioners, tmp_path):
    """Expected texts: what the original InternLM2Tokenizer (transformers 4.44) decodes these ids to."""
    folder = checkpoints["internlm2"]
    sp = spm.SentencePieceProcessor(model_file=folder + "/tokenizer.model")
    tokenizer = captioners["internlm2"].tokenizer
    ids = [1] + sp.encode("a cat , a dog") + [tokenizer.convert_tokens_to_ids("<img>")] + sp.encode("it's fine !")
    # special tokens dropped, then the clean-up of transformers 4.x that InternLM2Tokenizer always ran
    assert tokenizer.decode(ids) == "a cat, a dog it's fine!"
    ids = sp.encode(" hello , world") + [2, tokenizer.convert_tokens_to_ids("<|im_end|>")] + sp.encode("you  re  ok ?")
    assert tokenizer.decode(ids) == " hello, world you  re  ok?"
    # added tokens that are not listed as special stay in the text as separate words
    for name in ("tokenizer.model", "added_tokens.json"):
        (tmp_path / name).write_bytes(open(f"{folder}/{name}", "rb").read())
    config = json.loads(open(folder + "/tokenizer_config.json").read())
    config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = internvl.InternLM2Tokenizer(str(tmp_path))
    n = sp.get_piece_size()
    ids = [1] + sp.encode("a cat , a dog") + [n] + sp.encode("it's fine !") + [n + 1, n + 2, 3, 4] + sp.encode("x")
    assert tokenizer.decode(ids) == "a cat, a dog <img> it's fine! </img> <|plugin|> <|interpreter|> x"
    ids = [n, n + 1] + sp.encode(" hello") + [8, 7, 5] + sp.encode("you  re  ok ?") + [n + 3]
    assert tokenizer.decode(ids) == "<img> </img>  hello <|action_end|> you  re  ok? <quad>"


SYSTEM_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def test_internvl2_5_and_internvl3_prompt_ids(checkpoints, captioners):
    """The internvl2_5 template of InternVL2.5, InternVL3 and InternVL3.5 (conversation.py: MPT style, sep
    "<|im_end|>\n", its own system message) over InternLM2.5, Qwen2.5 and Qwen3; the end token is "<|im_end|>"."""
    question = presets.INTERNVL["background"]
    query = ("<|im_start|>system\n" + SYSTEM_2_5 + "<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 * 2
             + "</img>\n" + question + "<|im_end|>\n<|im_start|>assistant\n")
    for variant in ("qwen2_5", "qwen3"):  # InternVL3.5 (Qwen3): the same template and tokenizer format
        folder = checkpoints[variant]
        assert captioners[variant].prompt_ids(question, 2) == Tokenizer.from_file(
            folder + "/tokenizer.json").encode(query).ids  # the original's fast tokenizer
    folder = checkpoints["internlm2_5"]
    sp = spm.SentencePieceProcessor(model_file=folder + "/tokenizer.model")
    with open(folder + "/tokenizer_config.json") as f:
        ids = {t["content"]: int(i) for i, t in json.load(f)["added_tokens_decoder"].items()}
    start, end = ids["<|im_start|>"], ids["<|im_end|>"]
    # the slow tokenizer: sentencepiece on each piece between the added tokens, BOS first
    expected = ([1, start] + sp.encode("system\n" + SYSTEM_2_5) + [end] + sp.encode("\n") + [start]
                + sp.encode("user\n") + [ids["<img>"]] + [ids["<IMG_CONTEXT>"]] * 256 * 2 + [ids["</img>"]]
                + sp.encode("\n" + question) + [end] + sp.encode("\n") + [start] + sp.encode("assistant\n"))
    assert captioners["internlm2_5"].prompt_ids(question, 2) == expected
    qwen_end = Tokenizer.from_file(checkpoints["qwen2_5"] + "/tokenizer.json").token_to_id("<|im_end|>")
    for variant, end_id in (("internlm2_5", end), ("qwen2_5", qwen_end), ("qwen3", qwen_end)):
        assert captioners[variant].template["sep"] == "<|im_end|>\n"
        assert captioners[variant].end_token_ids == [end_id]


IMAGE_SIZES = [(900, 450), (300, 600), (200, 200)]  # with at most 2 tiles: 2+1, 2+1 and 1 tiles


@pytest.mark.parametrize("variant", ["internlm2", "internlm2-vit6b", "qwen2", "internlm2_5", "qwen2_5", "qwen3"])
def test_batched_prompts_match_one_by_one(variant, captioners):
    captioner = captioners[variant]
    images = [internvl.prepare_image(noise_image(w, h, seed=k), max_tiles=2) for k, (w, h) in enumerate(IMAGE_SIZES)]
    assert [len(x) for x in images] == [3, 3, 1]
    prompts = [presets.INTERNVL[k] for k in ("detail", "noun")]
    vision_calls = []
    hook = captioner.model.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs, output: vision_calls.append(len(kwargs["pixel_values"])), with_kwargs=True)
    try:
        batched = captioner.caption(images, prompts)  # 6 (image, prompt) pairs, left-padded, in one generate()
    finally:
        hook.remove()
    assert vision_calls == [7]  # one vision pass over all 7 tiles, shared by both prompts
    assert len(batched) == 3 and all(len(row) == 2 for row in batched)
    for i, image in enumerate(images):
        for j, prompt in enumerate(prompts):
            single = captioner.caption([image], [prompt])[0][0]
            assert batched[i][j] == single, (i, j)
    texts = {c.text for row in batched for c in row}
    assert len(texts) > 1  # the images and prompts reach the output


@pytest.mark.parametrize("variant", ["internlm2", "qwen2"])
def test_answers_end_at_the_end_token(variant, early_end_checkpoints):
    """Rows that finish early (then padded by generate) decode as one-by-one; truncated only without an end."""
    captioner = internvl.InternVLCaptioner(make_settings(early_end_checkpoints[variant], max_new_tokens=8),
                                           torch.device("cpu"))
    images = [internvl.prepare_image(noise_image(w, h, seed=k), max_tiles=2) for k, (w, h) in enumerate(IMAGE_SIZES)]
    prompts = [presets.INTERNVL[k] for k in ("detail", "noun")]
    batched = captioner.caption(images, prompts)
    assert {c.truncated for row in batched for c in row} == {True, False}
    for i, image in enumerate(images):
        for j, prompt in enumerate(prompts):
            assert batched[i][j] == captioner.caption([image], [prompt])[0][0], (i, j)


RECIPE = ("detail", "noun", "background", "main", "style")  # the paper's five prompts, 5 to 19 words


@pytest.fixture(scope="module")
def one_prompt_at_a_time(captioners):
    """{variant: (images, captions[i][j] of image i with the j-th RECIPE prompt, from one caption() per prompt)}."""
    images = [internvl.prepare_image(noise_image(w, h, seed=k), max_tiles=2) for k, (w, h) in enumerate(IMAGE_SIZES)]
    images = [images[0], images[2]]  # 3 tiles and 1 tile: prefixes of different lengths
    references = {}
    for variant in ("internlm2", "qwen2"):
        by_prompt = [captioners[variant].caption(images, [presets.INTERNVL[key]]) for key in RECIPE]
        references[variant] = images, [[captions[i][0] for captions in by_prompt] for i in range(len(images))]
    return references


@pytest.mark.parametrize("variant,cache", [("internlm2", "dynamic"), ("qwen2", "dynamic"), ("internlm2", "static")])
def test_five_prompt_recipe_matches_one_prompt_at_a_time(variant, cache, checkpoints, captioners,
                                                         one_prompt_at_a_time):
    """The five prompts of the recipe (questions of different lengths) for images of different tile counts in one
    caption(): each image's tokens before the question are prefilled once (utils/generation/shared_prefix.py), and
    every caption is the one of the plain path with that prompt alone. "static" is the cache that CUDA graphs decode
    with, here on the CPU."""
    if cache == "static":
        captioner = internvl.InternVLCaptioner(make_settings(checkpoints[variant]), torch.device("cpu"))
        decode_with_cuda_graphs(captioner.model)  # a static KV cache; no graphs on the CPU
    else:
        captioner = captioners[variant]
    images, expected = one_prompt_at_a_time[variant]
    prompts = [presets.INTERNVL[key] for key in RECIPE]
    own_lengths = {len(captioner.prompt_ids(prompt, 1)) for prompt in prompts}
    assert len(own_lengths) >= 4  # mixed question lengths
    prefills = []  # (sequences, tokens) of every language-model call that is not a decode step
    hook = captioner.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: prefills.append(tuple(kwargs["inputs_embeds"].shape[:2]))
        if kwargs["inputs_embeds"].shape[1] > 1 else None, with_kwargs=True)
    try:
        batched = captioner.caption(images, prompts)
    finally:
        hook.remove()
    # the image tokens (3 x 256 of the larger image) once per image, then only the questions of 2 x 5 rows
    assert len(prefills) == 2 and prefills[0][0] == 2 and prefills[0][1] > 3 * 256
    assert prefills[1][0] == 10 and prefills[1][1] < 40
    assert batched == expected


@pytest.mark.parametrize("variant", ["internlm2", "qwen2"])
def test_refilled_rows_give_the_captions_of_each_row_alone(variant, early_end_checkpoints, monkeypatch):
    """--decode-rows (utils/generation/refill.py): 3 images x 5 prompts in 7 rows. Rows join image by image while
    rows of other images are still decoding, at other columns and positions, each image's prefix kept once (cascade
    attention); each caption, ended or truncated, is the one of that image with that prompt alone."""
    from utils.generation import refill
    settings = make_settings(early_end_checkpoints[variant], attn_implementation="sdpa_grouped", decode_rows=7)
    captioner = internvl.InternVLCaptioner(settings, torch.device("cpu"))
    images = [internvl.prepare_image(noise_image(w, h, seed=k), max_tiles=2) for k, (w, h) in enumerate(IMAGE_SIZES)]
    prompts = [presets.INTERNVL[key] for key in RECIPE]
    joined = []  # (rows that join, rows still decoding in other slots)
    place = refill.Slots.place

    def place_and_note(slots, indices, rows, *args):
        joined.append((rows, [row for row in slots.rows if row is not None]))
        place(slots, indices, rows, *args)
    monkeypatch.setattr(refill.Slots, "place", place_and_note)
    entries = []  # the PrefixPool entry each image's prefix went to
    pool_place = refill.PrefixPool.place
    monkeypatch.setattr(refill.PrefixPool, "place", lambda pool, into, *args: (entries.append(into),
                                                                               pool_place(pool, into, *args)))
    refilled = captioner.caption(images, prompts)
    assert [rows for rows, _ in joined] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert entries == [[0], [1], [2]]  # each image's prefix once, in an entry of its own (7 rows: 3 entries)
    assert any(live for _, live in joined)  # a row decoded on while another image's rows joined
    assert {c.truncated for row in refilled for c in row} == {True, False}
    captioner.decode_rows = None
    for i, image in enumerate(images):
        for j, prompt in enumerate(prompts):
            assert refilled[i][j] == captioner.caption([image], [prompt])[0][0], (i, j)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("variant", ["internlm2", "qwen2"])
def test_shared_prefix_gives_the_tokens_of_plain_generate_on_gpu(variant, checkpoints):
    """float32 on the GPU, the default attention: the shared-prefix path and plain generate() over the full
    left-padded sequences give the same tokens, decoding eagerly and as CUDA graphs (with the prefill compiled)."""
    captioner = internvl.InternVLCaptioner(make_settings(checkpoints[variant], max_new_tokens=16,
                                                         attn_implementation="sdpa_grouped"), torch.device("cuda"))
    images = [internvl.prepare_image(noise_image(w, h, seed=k), max_tiles=2) for k, (w, h) in enumerate(IMAGE_SIZES)]
    prompts = [presets.INTERNVL[key] for key in RECIPE]
    with torch.inference_mode():
        ids, features = captioner.prompt_inputs(images, prompts)
    captioner.skip_dynamic_rope_check(max(len(x) for rows in ids for x in rows) + 16)
    tokens = tokens_of_all_paths(captioner.model, ids, features, captioner.image_token_id, captioner.pad_token_id,
                                  eos_token_id=captioner.end_token_ids, **captioner.generation)
    assert len({str(rows) for rows in tokens.values()}) == 1, tokens
    assert len(tokens["eager", "generate_left_padded"]) == 15


@pytest.mark.parametrize("variant,template", [("qwen2", "Hermes-2"), ("qwen2_5", "internvl2_5"),
                                              ("internlm2_5", "internvl2_5"), ("qwen3", "internvl2_5")])
def test_native_conversion_roundtrip(variant, template, checkpoints, captioners, tmp_path):
    """The native (-hf) folder of each: the captions of the original layout."""
    out = convert_internvl.convert_checkpoint(checkpoints[variant], str(tmp_path / "native"),
                                              captioners[variant].image_token_id)
    with open(out + "/config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "internvl" and config["template"] == template
    assert config["tie_word_embeddings"] is False
    native = internvl.InternVLCaptioner(make_settings(out), torch.device("cpu"))
    images = [internvl.prepare_image(noise_image(w, h, seed=k), max_tiles=2) for k, (w, h) in enumerate(IMAGE_SIZES)]
    prompts = [presets.INTERNVL["detail"]]
    assert native.caption(images, prompts) == captioners[variant].caption(images, prompts)


HF_CHAT_TEMPLATE = (  # the chat template of OpenGVLab's *-hf folders (transformers' InternVL conversion)
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{{ message['content'] }}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}")


def test_native_folder_without_template_uses_its_chat_template(checkpoints, captioners, tmp_path):
    out = convert_internvl.convert_checkpoint(checkpoints["qwen2"], str(tmp_path / "hf"),
                                              captioners["qwen2"].image_token_id)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["template"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config,
                                                                       "chat_template": HF_CHAT_TEMPLATE}))
    tokenizer = Tokenizer.from_file(out + "/tokenizer.json")
    end = tokenizer.token_to_id("<|im_end|>")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": end}))
    captioner = internvl.InternVLCaptioner(make_settings(out), torch.device("cpu"))
    question = presets.INTERNVL["short"]
    query = ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 + "</img>\n" + question + "<|im_end|>\n"
             "<|im_start|>assistant\n")
    assert captioner.prompt_ids(question, 1) == tokenizer.encode(query).ids
    assert captioner.end_token_ids == [end]
    [[caption]] = captioner.caption([internvl.prepare_image(noise_image(200, 200), max_tiles=2)], [question])
    assert caption.text


def test_user_errors(checkpoints, tmp_path):
    with pytest.raises(UserError, match="not found"):
        fetch_folder(str(tmp_path / "missing"), internvl.CHECKPOINT_FILES)
    with open(checkpoints["internlm2"] + "/config.json") as f:
        config = json.load(f)
    with pytest.raises(UserError, match="ps_version"):
        convert_internvl.native_config({**config, "ps_version": "v1"})
    with pytest.raises(UserError, match="unsupported language model"):
        convert_internvl.native_config({**config, "llm_config": {**config["llm_config"],
                                                                 "architectures": ["GPT2LMHeadModel"]}})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(UserError, match="not an InternVL2 checkpoint"):
        internvl.load_model(str(tmp_path / "other"), torch.float32, "cpu", 0)


# llm_config of InternVL2-4B (Phi-3-mini-128k, LongRoPE under its old name "su") and of InternVL2-40B/76B
# (Llama family), shrunk to the tiny sizes.
PHI3_LLM = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attn_implementation": "flash_attention_2",
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "sliding_window": 262144, "bos_token_id": 1, "eos_token_id": 32000,
            "pad_token_id": 32000, "vocab_size": 32020,
            "rope_scaling": {"type": "su", "long_factor": [1.0 + k for k in range(8)],
                             "short_factor": [1.0 + k / 10 for k in range(8)]}}
LLAMA_LLM = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attn_implementation": "flash_attention_2",
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
             "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 96}  # (ids shrunk with the vocabulary)


QWEN3_LLM = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attn_implementation": "flash_attention_2",
             "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None,
             "head_dim": 32, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
             "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 96}  # InternVL3.5's (its q and k norms included)


@pytest.mark.parametrize("llm_config,rope_type", [(PHI3_LLM, "longrope"), (LLAMA_LLM, "default"),
                                                  (QWEN3_LLM, "default")])
def test_other_language_models_convert(tmp_path, llm_config, rope_type):
    """Phi-3, Llama and Qwen3 (InternVL3.5) checkpoints keep transformers' own key names under language_model.: the
    converted model's text path must give the logits of the plain causal LM with those weights."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from internvl_checkpoint import TINY_LLM, build_config, random_state_dict

    config = build_config("qwen2", vocab_size=llm_config["vocab_size"], token_ids={})
    config["llm_config"] = {**llm_config, **TINY_LLM, "tie_word_embeddings": False}
    native = convert_internvl.native_config(config)
    assert native.text_config.rope_parameters["rope_type"] == rope_type
    assert native.text_config.rope_parameters["rope_theta"] == llm_config["rope_theta"]
    torch.manual_seed(0)
    text_model = AutoModelForCausalLM.from_config(native.text_config, attn_implementation="eager").eval()
    weights = {k: v for k, v in random_state_dict(config).items() if not k.startswith("language_model.")}
    weights.update({"language_model." + k: v.clone() for k, v in text_model.state_dict().items()})
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(weights, str(tmp_path / "model.safetensors"))
    model = internvl.load_model(str(tmp_path), torch.float32, "cpu", llm_config["vocab_size"] - 1, "eager")
    input_ids = torch.tensor([[1, 5, 9, 33, 2, 70, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, text_model(input_ids=input_ids).logits)


@pytest.mark.parametrize("variant", ["internlm2", "qwen3"])  # InternVL2, InternVL3.5
def test_generate_sh_end_to_end(variant, checkpoints, captioners, image_folder, tmp_path):
    """The real script through generate.sh, with refilled rows (--decode-rows: 3 images x 2 prompts in 3 rows):
    every image and prompt gets the one-by-one caption, broken entries go to the errors file."""
    folder, good, broken = image_folder
    images = [name for name in good if name in ("wide.png", "rgba.png", "gray16.png")]
    entries = images + broken[:2]
    input_file = tmp_path / "input.json"
    input_file.write_text(json.dumps([{"image": name, "id": k} for k, name in enumerate(entries)]))
    out = tmp_path / "out"
    run_command(["bash", "generate.sh", str(input_file), "internvl", "--model", checkpoints[variant],
                 "--image-root", str(folder), "--output-dir", str(out), "--prompts", "detail,noun",
                 "--temperature", "0", "--max-new-tokens", "8", "--attn-implementation", "sdpa_grouped",
                 "--decode-rows", "3", "--batch-size", "3", "--num-workers", "1", "--max-tiles", "2"])
    model_dir = out / "internvl" / variant
    captioner = captioners[variant]
    for key in ("detail", "noun"):
        rows = read_jsonl(model_dir / key / "captions-00000-of-00001.jsonl")
        assert sorted(row["image"] for row in rows) == sorted(images)
        for row in rows:
            tiles = internvl.prepare_image(Image.open(folder / row["image"]), max_tiles=2)
            expected = captioner.caption([tiles], [presets.INTERNVL[key]])[0][0]
            assert (row["caption"], row["truncated"]) == (expected.text, expected.truncated), row
            assert row["prompt"] == key and row["id"] == entries.index(row["image"])
    errors = read_jsonl(model_dir / "errors-00000-of-00001.jsonl")
    assert sorted(row["image"] for row in errors) == sorted(broken[:2])


def test_convert_to_command(checkpoints, captioners, tmp_path):
    """--convert-to is the script's own flag: no --input-json needed; the native folder captions as the original."""
    assert "--convert-to DIR" in run_command(["python", "internvl.py", "--help"]).stdout
    out = tmp_path / "native"
    run_command(["python", "internvl.py", "--convert-to", str(out), "--model", checkpoints["qwen2"]])
    assert json.loads((out / "config.json").read_text())["model_type"] == "internvl"
    native = internvl.InternVLCaptioner(make_settings(str(out)), torch.device("cpu"))
    images = [internvl.prepare_image(noise_image(w, h, seed=k), max_tiles=2) for k, (w, h) in enumerate(IMAGE_SIZES)]
    prompts = [presets.INTERNVL[key] for key in ("detail", "noun")]
    assert native.caption(images, prompts) == captioners["qwen2"].caption(images, prompts)
    failed = run_command(["python", "internvl.py", "--convert-to", str(tmp_path / "x"), "--model",
                          str(tmp_path / "missing")], check=False)
    assert failed.returncode == 2 and failed.stderr.strip().count("\n") == 0 and "not found" in failed.stderr
