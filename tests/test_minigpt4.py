"""minigpt4.py on tiny random-weight files in the original MiniGPT-4 formats (see minigpt4_checkpoint.py)."""
import contextlib
import functools
import http.server
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minigpt4
from conftest import model_settings, read_jsonl, run_command
from minigpt4 import MiniGPT4Captioner
from minigpt4_checkpoint import DIMS, build
from sample_images import write_input
from utils.command_line import build_parser
from utils.errors import UserError

PROMPT = MiniGPT4Captioner.prompts["default"]
LLM = {"vicuna0": "vicuna", "llama2": "llama2"}
CKPT = {"vicuna0": "pretrained_minigpt4.pth", "llama2": "pretrained_minigpt4_llama2_7b.pth"}
EVAL_CONFIG = {"vicuna0": "minigpt4_eval.yaml", "llama2": "minigpt4_llama2_eval.yaml"}


def make_settings(*argv):
    """The script's own command line, as the loop resolves it, in float32 with eager attention."""
    return model_settings(MiniGPT4Captioner, "--temperature", "0", "--max-new-tokens", "12",
                          "--attn-implementation", "eager", *argv)


def flag_args(root, model_type, *argv):
    return make_settings("--model-type", model_type, "--vit", f"{root}/eva_vit_g.pth",
                         "--qformer", f"{root}/blip2_pretrained_flant5xxl.pth",
                         "--minigpt4-ckpt", f"{root}/{CKPT[model_type]}", "--llm", f"{root}/{LLM[model_type]}", *argv)


def yaml_captioner(root, model_type, *argv):
    """From the eval config alone; the ViT and Q-Former files are found in the download cache, as the original does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", f"{root}/torch_home")
        settings = make_settings("--cfg-path", f"{root}/repo/eval_configs/{EVAL_CONFIG[model_type]}", *argv)
        return MiniGPT4Captioner(settings, "cpu")


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("minigpt4")))


@pytest.fixture(scope="session")
def captioners(root):
    return {model_type: MiniGPT4Captioner(flag_args(root, model_type), "cpu") for model_type in LLM}


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (320, 96), dtype=np.uint8)),  # grayscale, tall
        Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA"),
        Image.new("RGB", (500, 375), (30, 120, 200)),
    ]


def same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("model_type", ["vicuna0", "llama2"])
def test_batched_equals_one_image_at_a_time(captioners, images, model_type):
    captioner = captioners[model_type]
    prepared = [captioner.prepare(image) for image in images]
    prompts = [PROMPT, "What is in the picture?"]
    batched = captioner.caption(prepared, prompts)
    single = [[captioner.caption([image], [prompt])[0][0] for prompt in prompts] for image in prepared]
    assert batched == single
    assert len({caption.text for row in batched for caption in row}) > 1  # the captions depend on the inputs


@pytest.mark.parametrize("model_type", ["vicuna0", "llama2"])
def test_config_and_flags_load_the_same_model(root, captioners, images, model_type):
    from_config = yaml_captioner(root, model_type)
    assert from_config.model_type == model_type
    assert same_weights(from_config.model, captioners[model_type].model)
    prepared = [from_config.prepare(image) for image in images[:2]]
    assert from_config.caption(prepared, [PROMPT]) == captioners[model_type].caption(prepared, [PROMPT])


@pytest.mark.parametrize("model_type", ["vicuna0", "llama2"])
def test_blip2_folder_gives_the_lavis_model(root, captioners, model_type):
    settings = make_settings("--model-type", model_type, "--blip2", f"{root}/blip2-hf",
                             "--model", f"{root}/{CKPT[model_type]}", "--llm", f"{root}/{LLM[model_type]}")
    captioner = MiniGPT4Captioner(settings, "cpu")
    assert same_weights(captioner.model, captioners[model_type].model)


def test_architecture_as_the_original(captioners):
    vicuna, llama2 = captioners["vicuna0"].model, captioners["llama2"].model
    assert len(vicuna.vision_model.encoder.layers) == DIMS["vit_blocks_in_file"] - 1  # the last EVA block is dropped
    assert vicuna.ln_vision.eps == 1e-5
    pixels = torch.zeros(1, 3, 224, 224)
    assert vicuna.encode_images(pixels).shape == (1, DIMS["num_query_tokens"], DIMS["llm_width"])
    patches = (224 // DIMS["patch_size"]) ** 2
    assert llama2.qformer is None and llama2.encode_images(pixels).shape == (1, patches // 4, DIMS["llm_width"])
    # the Llama-2 variant never loads the Q-Former file: its ln_vision is an untrained LayerNorm
    assert torch.equal(llama2.ln_vision.weight, torch.ones(DIMS["vit_width"]))
    assert torch.equal(llama2.ln_vision.bias, torch.zeros(DIMS["vit_width"]))


def test_eva_qkv_bias_is_q_zero_v(root, captioners):
    eva = torch.load(f"{root}/eva_vit_g.pth", weights_only=True)
    bias = captioners["vicuna0"].model.vision_model.encoder.layers[1].self_attn.qkv.bias
    width = DIMS["vit_width"]
    assert torch.equal(bias[:width], eva["blocks.1.attn.q_bias"])
    assert not bias[width:2 * width].any()
    assert torch.equal(bias[2 * width:], eva["blocks.1.attn.v_bias"])


def test_prompt_segments_as_the_original(captioners):
    system = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
              "it to you. Please answer my questions.")
    assert minigpt4.TEMPLATES["vicuna0"].format(PROMPT).split("<ImageHere>") == [
        system + "###Human: <Img>", "</Img> Describe image content in English in detail:###Assistant: "]
    assert minigpt4.TEMPLATES["llama2"].format(PROMPT).split("<ImageHere>") == [
        system + "<s>[INST] <Img>", "</Img> Describe image content in English in detail: [/INST] "]
    tokenizer = captioners["llama2"].tokenizer
    sp = tokenizer.sp
    first = tokenizer.encode(system + "<s>[INST] <Img>", bos=True)
    # BOS in front; the '<s>' in the text is the BOS id; each side is encoded on its own, with a dummy prefix
    assert first == [sp.bos_id()] + sp.encode(system) + [sp.bos_id()] + sp.encode("[INST] <Img>")
    assert tokenizer.encode("</Img> Describe", bos=False) == sp.encode("</Img> Describe")
    assert sp.id_to_piece(sp.encode("</Img> Describe")[0]).startswith("▁")


def test_answer_cleaning_and_stops(captioners):
    captioner = captioners["vicuna0"]
    tokenizer = captioner.tokenizer

    def answer(text, eos=False):
        ends = [tokenizer.eos_id, tokenizer.eos_id] if eos else []
        return captioner.answer(tokenizer.encode(text, bos=False) + ends)

    assert answer(" A dog runs. ###Human: what") == ("A dog runs.", False)
    assert answer("The image shows Assistant: a cat ") == ("a cat", True)
    assert answer(" A dog runs.", eos=True) == ("A dog runs.", False)
    stop = minigpt4.StopOnText(tokenizer, "###", tokenizer.sp.get_piece_size() + 5, "cpu")
    rows = torch.tensor([tokenizer.encode("a ###", bos=False)[-2:], tokenizer.encode("a dog", bos=False)[-2:]])
    rows = torch.cat([rows, rows[:, -1:]], dim=1)  # one token more: the check runs a step late
    assert [stop(rows[:, :length], None).tolist() for length in (1, 2, 3)] == [[False] * 2, [False] * 2, [True, False]]


def test_stop_on_text_ends_each_row_one_step_after_its_text_first_holds_the_stop(captioners):
    """StopOnText decodes only rows whose newest token may end the stop text, a step late; each row must still end
    one step after the first step at which its whole decoded text holds '###', as a check of every row at every
    step finds. Its steps are those of generate(): the tokens so far, one more at each call."""
    tokenizer = captioners["vicuna0"].tokenizer
    stop = minigpt4.StopOnText(tokenizer, "###", tokenizer.sp.get_piece_size() + 5, "cpu")
    hashes = [i for i in range(tokenizer.sp.get_piece_size()) if "#" in tokenizer.decode([i])]
    assert hashes, "the tiny vocabulary needs pieces with '#'"
    words = tokenizer.encode(" a dog runs on the grass", bos=False)
    generator = torch.Generator().manual_seed(0)
    choices = torch.tensor(hashes + words * 2)  # '#' often, so that '###' forms from several pieces
    rows = choices[torch.randint(len(choices), (64, 12), generator=generator)]
    first_held = [next((t for t in range(1, 12) if "###" in tokenizer.decode(rows[row, :t].tolist())), None)
                  for row in range(len(rows))]
    assert None in first_held and len(set(first_held)) > 3
    ended = [None] * len(rows)
    for t in range(1, 13):  # all rows as one batch, as generate() calls it
        for row in stop(rows[:, :t], None).nonzero().flatten().tolist():
            ended[row] = ended[row] or t
    assert ended == [t and t + 1 for t in first_held]


def test_repetition_penalty_includes_bos(captioners):
    bos = captioners["vicuna0"].tokenizer.bos_id
    scores = torch.tensor([[2.0, 2.0, 2.0, -2.0], [2.0, 2.0, 2.0, -2.0]])
    penalised = minigpt4.RepetitionPenaltyWithBos(1.05, bos)(torch.tensor([[3], [0]]), scores.clone())
    expected = scores.clone()
    expected[:, bos] /= 1.05
    expected[0, 3] *= 1.05
    expected[1, 0] /= 1.05
    assert torch.allclose(penalised, expected)


def test_preprocess_as_blip2_image_eval():
    pixels = minigpt4.preprocess(Image.new("RGBA", (50, 30), (255, 0, 128, 7)), size=224)
    assert pixels.shape == (3, 224, 224)
    color = torch.tensor([255, 0, 128]) / 255
    expected = (color - torch.tensor(minigpt4.CLIP_MEAN)) / torch.tensor(minigpt4.CLIP_STD)
    assert torch.allclose(pixels[:, 100, 100], expected, atol=1e-6)


def test_decoding_defaults_as_the_original_scripts_and_chat_answer():
    parser, _ = build_parser(MiniGPT4Captioner)
    args = parser.parse_args(["--input-json", "unused.json"])
    assert (args.batch_size, args.max_new_tokens, args.temperature) == (3, 77, None)
    decoding = model_settings(MiniGPT4Captioner, "--model", "pretrained_minigpt4.pth", "--llm", "vicuna").decoding
    assert decoding.generate_kwargs(**minigpt4.CHAT_GENERATION) == {
        "temperature": 0.5, "top_p": 0.9, "min_length": 1, "length_penalty": 1.0, "max_new_tokens": 77,
        "num_beams": 1, "do_sample": True}


def test_user_errors_are_one_line(root):
    with pytest.raises(UserError, match="MiniGPT-4 checkpoint not found"):
        MiniGPT4Captioner(flag_args(root, "vicuna0", "--model", f"{root}/missing.pth"), "cpu")
    with pytest.raises(UserError, match="does model type vicuna0 match the checkpoint"):
        MiniGPT4Captioner(flag_args(root, "vicuna0", "--model", f"{root}/{CKPT['llama2']}"), "cpu")
    with pytest.raises(UserError, match="not an EVA ViT-g state dict"):
        MiniGPT4Captioner(flag_args(root, "vicuna0", "--vit", f"{root}/{CKPT['vicuna0']}"), "cpu")
    with pytest.raises(UserError, match="no LLM folder"):
        MiniGPT4Captioner(make_settings("--model", f"{root}/{CKPT['vicuna0']}"), "cpu")
    with pytest.raises(UserError, match="config not found"):
        MiniGPT4Captioner(make_settings("--cfg-path", os.path.join(root, "nope.yaml")), "cpu")


def test_answer_can_end_at_the_first_token(root, images):
    """The original's min_length=1 counts the BOS placeholder of transformers 4.30, so EOS may come first."""
    captioner = MiniGPT4Captioner(flag_args(root, "vicuna0", "--max-new-tokens", "1"), "cpu")
    image = captioner.prepare(images[0])
    generated = []
    answer = captioner.answer
    captioner.answer = lambda ids: generated.append(ids) or answer(ids)
    captioner.caption([image], [PROMPT])
    lm_head = captioner.model.language_model.get_output_embeddings().weight
    with torch.no_grad():
        lm_head[captioner.tokenizer.eos_id] = 2 * lm_head[generated[0][0]]
    captioner.generation["max_new_tokens"] = 12
    assert captioner.caption([image], [PROMPT]) == [[("", False)]]


def test_end_to_end_through_the_script(root, captioners, image_folder, tmp_path):
    """generate.sh with the original scripts' --cfg-path: every caption equals the one-image reference, unreadable
    images are recorded."""
    from utils.images import open_image

    folder, good, broken = image_folder
    input_file = write_input(tmp_path / "input.json", good[:5] + broken[:2])
    run_command(["bash", "generate.sh", str(input_file), "minigpt4", "--cfg-path",
                 f"{root}/repo/eval_configs/{EVAL_CONFIG['vicuna0']}", "--image-root", str(folder),
                 "--output-dir", str(tmp_path / "out"), "--temperature", "0", "--max-new-tokens", "12",
                 "--attn-implementation", "eager", "--num-workers", "2"], env={"TORCH_HOME": f"{root}/torch_home"})
    out = tmp_path / "out" / "minigpt4" / "pretrained_minigpt4"  # named after the config's checkpoint file
    rows = read_jsonl(out / "default" / "captions-00000-of-00001.jsonl")
    assert sorted(row["image"] for row in rows) == sorted(good[:5])
    captioner = captioners["vicuna0"]
    for row in rows:
        expected = captioner.caption([captioner.prepare(open_image(folder / row["image"]))], [PROMPT])[0][0]
        assert (row["caption"], row["truncated"]) == expected, row["image"]
    assert sorted(row["image"] for row in read_jsonl(out / "errors-00000-of-00001.jsonl")) == sorted(broken[:2])


def test_script_reports_a_missing_file_in_one_line(root, tmp_path):
    input_file = write_input(tmp_path / "input.json", ["a.jpg"])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    result = run_command(["python", "minigpt4.py", "--input-json", str(input_file), "--output-dir", str(tmp_path),
                          "--vit", f"{root}/eva_vit_g.pth", "--qformer", f"{root}/blip2_pretrained_flant5xxl.pth",
                          "--model", f"{root}/nope.pth", "--llm", f"{root}/vicuna"], check=False)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"minigpt4.py: error: MiniGPT-4 checkpoint not found: {root}/nope.pth"
    assert "Traceback" not in result.stderr


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def file_server(folder):
    """A local HTTP server for `folder`: the download server the tests can reach."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_missing_vit_and_qformer_are_downloaded_into_the_hub_cache(root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    settings = make_settings("--model", f"{root}/{CKPT['vicuna0']}", "--llm", f"{root}/{LLM['vicuna0']}")
    with file_server(root) as url:
        monkeypatch.setenv("MINIGPT4_DOWNLOAD_URL", url)
        files = minigpt4.resolve_files(settings.model, settings.options)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert (files["vit"], files["qformer"]) == (str(cache / "eva_vit_g.pth"), str(cache / minigpt4.QFORMER_FILE))
    for name in ("eva_vit_g.pth", minigpt4.QFORMER_FILE):
        assert (cache / name).read_bytes() == (Path(root) / name).read_bytes()
    # found in the cache: the server is gone, nothing is fetched
    assert minigpt4.resolve_files(settings.model, settings.options) == files


def unreachable_url():
    with socket.socket() as closed:  # a port nobody listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{closed.getsockname()[1]}/"


def test_naming_the_checkpoint_downloads_nothing(root, tmp_path, monkeypatch):
    """The output folder's name comes from the eval config alone: with the ViT and Q-Former neither in the cache
    nor reachable, name_checkpoint and --check-input answer, and nothing is fetched (loading the model would)."""
    env = {"TORCH_HOME": str(tmp_path / "torch_home"), "MINIGPT4_DOWNLOAD_URL": unreachable_url()}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg_path = f"{root}/repo/eval_configs/{EVAL_CONFIG['vicuna0']}"
    assert MiniGPT4Captioner.name_checkpoint("minigpt4", make_settings("--cfg-path", cfg_path).options) == \
        "pretrained_minigpt4"
    input_file = write_input(tmp_path / "input.json", ["a.jpg"])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    result = run_command(["python", "minigpt4.py", "--check-input", "--input-json", str(input_file),
                          "--output-dir", str(tmp_path / "out"), "--cfg-path", cfg_path], env=env)
    assert "Traceback" not in result.stderr and "downloading" not in result.stderr
    assert not (tmp_path / "torch_home").exists()
    with pytest.raises(UserError, match="cannot be downloaded"):
        minigpt4.resolve_files("minigpt4", make_settings("--cfg-path", cfg_path).options)


def test_no_network_is_one_line_naming_file_url_and_flag(root, tmp_path):
    url = unreachable_url()
    input_file = write_input(tmp_path / "input.json", ["a.jpg"])
    result = run_command(["python", "minigpt4.py", "--input-json", str(input_file), "--output-dir", str(tmp_path),
                          "--model", f"{root}/{CKPT['vicuna0']}", "--llm", f"{root}/{LLM['vicuna0']}"],
                         check=False, env={"TORCH_HOME": str(tmp_path / "torch_home"), "MINIGPT4_DOWNLOAD_URL": url})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"minigpt4.py: error: eva_vit_g.pth is not in {cache} and cannot be downloaded "
                                f"from {url}eva_vit_g.pth (")
    assert last_line.endswith("): download it there, or pass --vit FILE")
    assert not [path for path in cache.iterdir() if path.name.endswith(".partial")]


def test_compiled_kernels_go_to_the_cache_folder_after_torchvision_named_the_default(tmp_path):
    """Importing minigpt4.py (torchvision) makes torch write its default, /tmp/torchinductor_$USER, into
    $TORCHINDUCTOR_CACHE_DIR before the loop starts: the loop's share_compiled_kernels still moves the kernels into
    the project's cache folder, and keeps a folder the user named."""
    own = str(tmp_path / "own")
    code = ("import os, minigpt4; from utils.caches import share_compiled_kernels; "
            "assert os.environ['TORCHINDUCTOR_CACHE_DIR']; share_compiled_kernels(); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR']); "
            f"os.environ['TORCHINDUCTOR_CACHE_DIR'] = {own!r}; share_compiled_kernels(); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    result = run_command(["python", "-c", code], env={"SYNTHETIC_CAPTION_CACHE": str(tmp_path / "cache"),
                                                      "TORCHINDUCTOR_CACHE_DIR": None})
    assert result.stdout.split() == [str(tmp_path / "cache" / "torchinductor"), own]
