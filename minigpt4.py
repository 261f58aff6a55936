"""MiniGPT-4 captions, from the original MiniGPT-4 files, without the MiniGPT-4 repository.

MiniGPT-4 is EVA ViT-g/14 (every block but the last) -> ln_vision -> BLIP-2 Q-Former with 32 query tokens ->
llama_proj -> Vicuna v0. The Llama-2 variant has no Q-Former: llama_proj maps each group of 4 neighbouring
patch features to one LLM embedding. The parts are transformers' Blip2VisionModel, Blip2QFormerModel and
LlamaForCausalLM; the weights come from the files MiniGPT-4 users have:

    eva_vit_g.pth                    EVA ViT-g, LAVIS names (downloaded into the torch hub cache when missing there,
                                     as the original does; so is the Q-Former file)
    blip2_pretrained_flant5xxl.pth   Q-Former, query tokens and ln_vision, LAVIS names (or a BLIP-2 folder in
                                     transformers format, e.g. Salesforce/blip2-flan-t5-xxl, for ViT + Q-Former)
    pretrained_minigpt4*.pth         the MiniGPT-4 checkpoint: {"model": {llama_proj.*}}
    the LLM folder                   Vicuna v0 or Llama-2-chat in HF format, with sentencepiece's tokenizer.model

found through the original eval config (--cfg-path) or given by flags. Prompts, image processing, decoding
and answer cleaning follow the original's Chat (minigpt4/conversation/conversation.py).
"""
import argparse
import fcntl
import functools
import http.client
import json
import os
import re
import socket
import sys
from pathlib import Path

import sentencepiece
import torch
import torchvision.transforms.functional as TF
import yaml
from safetensors import safe_open
from torch import nn
from transformers import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

import utils.attention  # noqa: F401  (registers the sdpa_grouped attention implementation)
from utils.captioning import (Caption, HostCopy, UserError, by_image, generation_kwargs, run, stack_to_device,
                             to_device_async)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The prompt the original Chat builds: CONV_VISION_*.copy(), upload_img (the image message), ask (the
# question joined to it with a space), answer (the empty assistant turn), get_prompt.
SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
TEMPLATES = {
    "vicuna0": SYSTEM + "###Human: <Img><ImageHere></Img> {}###Assistant: ",  # CONV_VISION_Vicuna0
    "llama2": SYSTEM + "<s>[INST] <Img><ImageHere></Img> {} [/INST] ",  # CONV_VISION_LLama2
}
STOP = "###"  # the original stops on the ids of '###' and cuts the answer there
# Chat.answer's generation arguments (num_beams 1 is the loop's default), the seed's temperature 0.5;
# its repetition_penalty of 1.05 is applied by RepetitionPenaltyWithBos below.
CHAT_GENERATION = {"temperature": 0.5, "top_p": 0.9, "min_length": 1, "length_penalty": 1.0}
REPETITION_PENALTY = 1.05
MAX_LENGTH = 2000  # Chat.answer keeps the last MAX_LENGTH - max_new_tokens context embeddings

EVA_FILE = "eva_vit_g.pth"
QFORMER_FILE = "blip2_pretrained_flant5xxl.pth"
# where the original downloads both files from (LAVIS' eva_vit.py, MiniGPT-4's default q_former_model);
# MINIGPT4_DOWNLOAD_URL replaces this folder, for a mirror (the tests point it at a local server)
LAVIS_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
DOWNLOAD_TIMEOUT = 30  # seconds a download may wait for the server before it counts as failed (no network)
MODEL_CONFIGS = {"vicuna0": "minigpt4_vicuna0.yaml", "llama2": "minigpt4_llama2.yaml"}
PLACEHOLDER = "please set this value"  # what the original configs hold until the user edits them

# LAVIS names -> transformers names, in this order, as transformers' BLIP-2 conversion script renames them.
LAVIS_TO_TRANSFORMERS = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.", "vision_model.encoder.layers."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".attn.proj.", ".self_attn.projection."),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("Qformer.bert.", "qformer."),
    ("attention.self.", "attention.attention."),  # also crossattention.self.
]


def preprocess(image, size):
    """The original's blip2_image_eval processor, after the seed's convert('RGB')."""
    image = TF.resize(image.convert("RGB"), [size, size], interpolation=TF.InterpolationMode.BICUBIC)
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


class SlowLlamaTokenizer:
    """The original's tokenizer, transformers 4.30's slow LlamaTokenizer, on sentencepiece itself: the special
    token strings in the text become their ids and every other piece of text is encoded on its own, with
    sentencepiece's dummy-prefix space. (Special tokens are taken to be AddedTokens without lstrip/rstrip,
    as Vicuna and Llama-2 folders declare them.)"""

    def __init__(self, path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.special = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.bos_id, self.eos_id)}
        self.special_split = re.compile("(" + "|".join(map(re.escape, self.special)) + ")")

    def encode(self, text, bos):
        ids = [self.bos_id] if bos else []
        for part in self.special_split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids):
        """decode(skip_special_tokens=True)"""
        return self.sp.decode([i for i in ids if i not in self.special.values()])


class StopOnText(StoppingCriteria):
    """Ends a row once its text holds `stop`. The original stops on two id sequences of '###'; text after the
    first '###' is cut off either way, so the answers are the same.

    A row's text can come to hold `stop` only at a step whose token decodes to text with stop's last character
    (sentencepiece text grows piece by piece; '#' is one byte, so no byte-fallback sequence makes one late).
    Such tokens are marked once for the whole vocabulary, and only rows that just generated one are decoded:
    decoding every row at every step took 1 s of each batch of 128 images (bench/RESULTS.md).

    The check runs one step late, so that it never waits for the GPU: each step's tokens (and which of them are
    marked) start their copy to the CPU, and the rows of the step before, whose copy has arrived by then, are
    checked. A row so ends one token after its text first holds `stop`, a token that answer() cuts off."""

    def __init__(self, tokenizer, stop, vocab_size, device):
        """vocab_size: the language model's, which may have ids past the tokenizer's pieces (never marked)."""
        self.tokenizer, self.stop = tokenizer, stop
        pieces = tokenizer.sp.get_piece_size()
        self.may_end_text = torch.tensor([i < pieces and stop[-1] in tokenizer.decode([i])
                                          for i in range(max(vocab_size, pieces))], device=device)
        self.start()

    def start(self):
        """Before each generate() call."""
        self.columns = None  # the call's tokens on the CPU so far, a list per step, all but the newest
        self.newest = None  # the newest step's tokens and their marks, on their way to the CPU

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(len(input_ids), dtype=torch.bool)
        if self.columns is None:  # the call's first step
            self.columns = input_ids[:, :-1].T.tolist()
        else:
            tokens, marked = self.newest.result().tolist()
            self.columns.append(tokens)
            for row in (row for row, mark in enumerate(marked) if mark):
                done[row] = self.stop in self.tokenizer.decode([column[row] for column in self.columns])
        newest = input_ids[:, -1]
        self.newest = HostCopy(torch.stack([newest, self.may_end_text[newest].long()]))
        return to_device_async(done, input_ids.device)


class RepetitionPenaltyWithBos(LogitsProcessor):
    """The repetition penalty as the original applies it: transformers 4.30 (its pinned version) generates from
    inputs_embeds with a BOS placeholder in input_ids, so the penalty also lowers BOS at every step."""

    def __init__(self, penalty, bos_id):
        self.penalty, self.bos_id = RepetitionPenaltyLogitsProcessor(penalty), bos_id

    def __call__(self, input_ids, scores):
        bos = input_ids.new_full((len(input_ids), 1), self.bos_id)
        return self.penalty(torch.cat([bos, input_ids], dim=1), scores)


class MiniGPT4(nn.Module):
    """The original MiniGPT4 module: visual_encoder, ln_vision, Qformer + query_tokens (Vicuna v0 only),
    llama_proj, llama_model; named as transformers names the BLIP-2 parts."""

    def __init__(self, vision_config, qformer_config, num_query_tokens, language_model):
        super().__init__()
        self.vision_model = Blip2VisionModel(vision_config)
        # MiniGPT-4's ln_vision (eps 1e-5) takes the place of transformers' post_layernorm (eps 1e-6)
        self.vision_model.post_layernorm = nn.Identity()
        self.ln_vision = nn.LayerNorm(vision_config.hidden_size, eps=1e-5)
        if qformer_config is None:
            self.qformer = None
            projection_in = 4 * vision_config.hidden_size
        else:
            self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_config.hidden_size))
            self.qformer = Blip2QFormerModel(qformer_config)
            projection_in = qformer_config.hidden_size
        self.llama_proj = nn.Linear(projection_in, language_model.config.hidden_size)
        self.language_model = language_model

    def encode_images(self, pixel_values):
        """The original's encode_img: LLM input embeddings for each image."""
        features = self.ln_vision(self.vision_model(pixel_values).last_hidden_state)
        if self.qformer is None:
            patches = features[:, 1:]
            batch, count, width = patches.shape
            return self.llama_proj(patches.reshape(batch, count // 4, 4 * width))
        queries = self.query_tokens.expand(len(features), -1, -1)
        return self.llama_proj(self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state)


def load_pth(path, what):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read {what} {path}: {error}")


def lavis_to_transformers(state):
    state = dict(state)
    for q_key in [key for key in state if key.endswith(".attn.q_bias")]:
        # EVA has biases for q and v only; transformers holds one qkv bias, zero for k
        prefix = q_key[: -len("q_bias")]
        q_bias, v_bias = state.pop(q_key), state.pop(prefix + "v_bias")
        state[prefix + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    converted = {}
    for key, value in state.items():
        for old, new in LAVIS_TO_TRANSFORMERS:
            key = key.replace(old, new)
        converted[key] = value
    return converted


def eva_vision_config(state, image_size, attn_implementation):
    """EVA ViT-g as create_eva_vit_g builds it: head width 88, MLP ratio 4.3637, eps 1e-6, one block fewer
    than the file holds (BLIP-2 and MiniGPT-4 use the second-to-last layer)."""
    if "cls_token" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise UserError("the ViT file is not an EVA ViT-g state dict (eva_vit_g.pth, LAVIS names)")
    width = state["cls_token"].shape[-1]
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("blocks.")}
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    positions = state["pos_embed"].shape[1]
    if positions != (image_size // patch_size) ** 2 + 1:
        raise UserError(f"the ViT has {positions} positions, image size {image_size} with patch {patch_size} "
                        f"needs {(image_size // patch_size) ** 2 + 1}")
    return Blip2VisionConfig(
        hidden_size=width, intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(blocks) - 1, num_attention_heads=width // 88, image_size=image_size,
        patch_size=patch_size, layer_norm_eps=1e-6, qkv_bias=True, attn_implementation=attn_implementation,
    )


def lavis_qformer_config(state, vision_width, attn_implementation):
    """The Q-Former as init_Qformer builds it: BERT-base layout (head width 64, eps 1e-12), cross-attention
    every 2nd layer."""
    if "query_tokens" not in state:
        raise UserError("the Q-Former file has no query_tokens (blip2_pretrained_flant5xxl.pth, LAVIS names)")
    width = state["query_tokens"].shape[-1]
    layers = {int(key.split(".")[4]) for key in state if key.startswith("Qformer.bert.encoder.layer.")}
    return Blip2QFormerConfig(
        hidden_size=width, num_hidden_layers=len(layers), num_attention_heads=width // 64,
        intermediate_size=state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=2, encoder_hidden_size=vision_width, layer_norm_eps=1e-12,
        attn_implementation=attn_implementation,
    )


def read_blip2_folder(folder, attn_implementation):
    """ViT, Q-Former and query tokens from a BLIP-2 folder in transformers format (its vision config already
    lacks the last EVA block); post_layernorm is LAVIS' ln_vision."""
    config = Blip2Config.from_pretrained(folder)
    config.vision_config._attn_implementation = attn_implementation
    config.qformer_config._attn_implementation = attn_implementation
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise UserError(f"missing {path} (BLIP-2 folders are read from safetensors)")
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if key.startswith(("vision_model.", "qformer.", "query_tokens")):
                    state[key.replace("vision_model.post_layernorm.", "ln_vision.")] = f.get_tensor(key)
    return config.vision_config, config.qformer_config, config.num_query_tokens, state


def read_eval_config(path):
    """The model section of an original eval config merged over its model_type's default model config, as
    the original's Config does, plus the eval image size."""
    if not os.path.isfile(path):
        raise UserError(f"config not found: {path}")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model") or {}
    model_type = str(model.get("model_type", "")).removeprefix("pretrain_")
    if model_type not in MODEL_CONFIGS:
        raise UserError(f"{path}: model_type must be pretrain_vicuna0 or pretrain_llama2, "
                        f"not {model.get('model_type')!r}")
    # the original finds the model config inside its package: <repo>/minigpt4/configs/models/
    repo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    defaults_path = os.path.join(repo, "minigpt4", "configs", "models", MODEL_CONFIGS[model_type])
    defaults = {}
    if os.path.isfile(defaults_path):
        with open(defaults_path) as f:
            defaults = (yaml.safe_load(f) or {}).get("model") or {}
    processor = config.get("datasets", {}).get("cc_sbu_align", {}).get("vis_processor", {}).get("train", {})
    return {**defaults, **model, "model_type": model_type, "image_size": processor.get("image_size", 224)}


def given(value):
    return value if value and PLACEHOLDER not in str(value) else None


def download_url(name):
    return os.environ.get("MINIGPT4_DOWNLOAD_URL", LAVIS_URL).rstrip("/") + "/" + name


def download_to_cache(url, path, flag):
    """Fetch a file the original would fetch, as it does (torch.hub's download_url_to_file with a progress bar,
    into torch hub's cache). The processes of one machine take turns on a lock file, so one downloads and the
    others find the file."""
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isfile(path):
                print(f"minigpt4.py: downloading {url} to {path}", file=sys.stderr, flush=True)
                torch.hub.download_url_to_file(url, path, progress=True)
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise UserError(f"{os.path.basename(path)} is not in {os.path.dirname(path)} and cannot be downloaded "
                        f"from {url} ({error}): download it there, or pass {flag} FILE") from None
    finally:
        socket.setdefaulttimeout(timeout)


def resolve_files(args):
    """Which files to load: flags first, then the eval config, then the original's defaults (downloaded into
    torch hub's cache when missing there, as the original does)."""
    config = read_eval_config(args.cfg_path) if args.cfg_path else {"image_size": 224}
    model_type = args.model_type or config.get("model_type", "vicuna0")
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    vit_url = download_url(EVA_FILE)
    qformer = given(config.get("q_former_model")) or download_url(QFORMER_FILE)
    qformer_url = qformer if qformer.startswith(("http://", "https://")) else None
    files = {
        "model_type": model_type,
        "has_qformer": config.get("has_qformer", model_type == "vicuna0"),
        "image_size": config["image_size"],
        "blip2": args.blip2,
        "vit": args.vit or os.path.join(cache, EVA_FILE),
        "qformer": args.qformer or (os.path.join(cache, os.path.basename(qformer_url)) if qformer_url else qformer),
        "ckpt": args.model if args.model != MiniGPT4Captioner.default_model else given(config.get("ckpt")),
        "llm": args.llm or given(config.get("llama_model")),
    }
    downloads = {}  # path -> URL of the files the original downloads, where no flag names another file
    if not args.vit:
        downloads[files["vit"]] = vit_url
    if not args.qformer and qformer_url:
        downloads[files["qformer"]] = qformer_url
    check_files(files, downloads)
    return files


def check_files(files, downloads):
    """Every file is checked before the first is loaded, and the small ones before anything is downloaded."""
    if not files["ckpt"]:
        raise UserError("no MiniGPT-4 checkpoint: pass --model (pretrained_minigpt4*.pth) or a --cfg-path "
                        "config with its ckpt set")
    if not files["llm"]:
        raise UserError("no LLM folder: pass --llm or set llama_model in the config")
    needed = [(files["ckpt"], "MiniGPT-4 checkpoint"), (os.path.join(files["llm"], "config.json"), "LLM config"),
              (os.path.join(files["llm"], "tokenizer.model"), "LLM tokenizer")]
    if files["blip2"]:
        needed.append((os.path.join(files["blip2"], "config.json"), "BLIP-2 folder config"))
    else:
        needed.append((files["vit"], "EVA ViT-g file"))
        if files["has_qformer"]:
            needed.append((files["qformer"], "Q-Former file"))
    for path, what in needed:
        if not os.path.isfile(path) and path in downloads:
            download_to_cache(downloads[path], path, "--vit" if path == files["vit"] else "--qformer")
        if not os.path.isfile(path):
            raise UserError(f"{what} not found: {path}")


def load_model(files, dtype, device, attn_implementation):
    language_model = LlamaForCausalLM.from_pretrained(
        files["llm"], dtype=dtype, device_map=device, attn_implementation=attn_implementation
    )
    # the original's load order: eva_vit_g.pth, then (with a Q-Former) the Q-Former checkpoint over the whole
    # model, then the MiniGPT-4 checkpoint; later files win, names the model lacks are ignored
    has_qformer = files["has_qformer"]
    if files["blip2"]:
        vision_config, qformer_config, num_query_tokens, state = read_blip2_folder(files["blip2"],
                                                                                   attn_implementation)
        if vision_config.image_size != files["image_size"]:
            raise UserError(f"the BLIP-2 ViT takes {vision_config.image_size} px images, the config asks for "
                            f"{files['image_size']}")
        if not has_qformer:  # its post_layernorm is BLIP-2's ln_vision, from the file the Llama-2 variant never loads
            state = {key: value for key, value in state.items() if not key.startswith("ln_vision.")}
    else:
        eva = load_pth(files["vit"], "EVA ViT-g file")
        vision_config = eva_vision_config(eva, files["image_size"], attn_implementation)
        state = lavis_to_transformers({f"visual_encoder.{key}": value for key, value in eva.items()})
        if has_qformer:
            blip2 = load_pth(files["qformer"], "Q-Former file")
            blip2 = blip2.get("model", {}) if isinstance(blip2, dict) else {}
            qformer_config = lavis_qformer_config(blip2, vision_config.hidden_size, attn_implementation)
            num_query_tokens = blip2["query_tokens"].shape[1]
            state.update(lavis_to_transformers(blip2))
    if not has_qformer:
        qformer_config = num_query_tokens = None
    ckpt = load_pth(files["ckpt"], "MiniGPT-4 checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{files['ckpt']} is not a MiniGPT-4 checkpoint (a dict with 'model')")
    state.update(lavis_to_transformers(ckpt["model"]))
    # where no file holds ln_vision (always so for Llama-2), the original keeps LayerNorm's initial values
    state.setdefault("ln_vision.weight", torch.ones(vision_config.hidden_size))
    state.setdefault("ln_vision.bias", torch.zeros(vision_config.hidden_size))

    with torch.device("meta"):  # the weights come from the files
        model = MiniGPT4(vision_config, qformer_config, num_query_tokens, language_model)
    expected = {key: param.shape for key, param in model.state_dict().items() if not key.startswith("language_model")}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"the files lack {len(missing)} weights, e.g. {missing[:3]}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise UserError(f"{key} has shape {tuple(state[key].shape)} in the files, the model needs "
                            f"{tuple(shape)} (does model type {files['model_type']} match the checkpoint?)")
    model.load_state_dict({key: state[key] for key in expected}, strict=False, assign=True)
    return model.to(device=device, dtype=dtype).eval()


class MiniGPT4Captioner:
    name = "minigpt4"
    default_model = "minigpt4"  # placeholder: the checkpoint comes from --cfg-path unless --model names it
    prompts = {"default": "Describe image content in English in detail:"}
    default_prompt = "default"
    defaults = {"batch_size": 3}  # the seed's; its max_new_tokens 77 is the loop's default
    default_dtype = "float16"  # the original runs the ViT (vit_precision fp16) and the LLM in float16
    caption_flags = ("cfg_path", "model_type", "vit", "qformer", "blip2", "llm")
    model_on_hub = False  # --model is the .pth file (or comes from --cfg-path), checked by resolve_files

    @staticmethod
    def add_arguments(parser):
        group = parser.add_argument_group("MiniGPT-4 files (flags win over --cfg-path)")
        add = group.add_argument
        add("--cfg-path", metavar="FILE", help="the original eval config, e.g. eval_configs/minigpt4_eval.yaml: its "
            "model_type, ckpt and llama_model (merged over <repo>/minigpt4/configs/models/minigpt4_<type>.yaml as "
            "the original does), q_former_model and image size are used")
        add("--model-type", choices=sorted(MODEL_CONFIGS), help="vicuna0 (Q-Former, '###Human:' template) or llama2 "
            "(no Q-Former, '[INST]' template); default: the config's, else vicuna0")
        add("--vit", metavar="FILE", help=f"EVA ViT-g weights ({EVA_FILE}); default: the original's download cache, "
            f"$TORCH_HOME/hub/checkpoints/{EVA_FILE}, downloaded there when missing")
        add("--qformer", metavar="FILE", help=f"BLIP-2 Q-Former checkpoint ({QFORMER_FILE}); default: the config's "
            "q_former_model, else the download cache (downloaded when missing); unused by llama2")
        add("--blip2", metavar="FOLDER", help="a BLIP-2 folder in transformers format (e.g. a download of "
            "Salesforce/blip2-flan-t5-xxl) as the source of ViT and Q-Former, instead of --vit/--qformer")
        add("--minigpt4-ckpt", dest="model", metavar="FILE", default=argparse.SUPPRESS, help="the same as --model: "
            "the MiniGPT-4 checkpoint with llama_proj (pretrained_minigpt4.pth, pretrained_minigpt4_llama2_7b.pth); "
            "its file name (from here or from --cfg-path) names the output folder; default: the --cfg-path config's ckpt")
        add("--llm", metavar="FOLDER", help="Vicuna v0 or Llama-2-chat folder in HF format with tokenizer.model; "
            "default: the config's llama_model")

    @staticmethod
    def checkpoint_name(args):
        """Output folder: the MiniGPT-4 checkpoint's file name, also when it comes from --cfg-path, so that two
        variants in one --output-dir never share (and skip) each other's captions."""
        return Path(resolve_files(args)["ckpt"]).stem

    def __init__(self, args, device):
        files = resolve_files(args)
        self.model_type = files["model_type"]
        self.device, self.dtype = device, args.dtype
        self.model = load_model(files, args.dtype, device, args.attn_implementation)
        self.tokenizer = SlowLlamaTokenizer(os.path.join(files["llm"], "tokenizer.model"))
        self.prepare = functools.partial(preprocess, size=files["image_size"])
        self.generation = generation_kwargs(args, **CHAT_GENERATION)
        self.segment_ids = functools.lru_cache(maxsize=64)(self.segment_ids)  # the same few prompts in every batch
        self.stop_on_text = StopOnText(self.tokenizer, STOP, self.model.language_model.config.vocab_size, device)

    def segment_ids(self, prompt):
        """The ids of the text before the image (with BOS) and after it (without), each tokenized on its own."""
        segments = TEMPLATES[self.model_type].format(prompt).split("<ImageHere>")
        if len(segments) != 2:
            raise UserError("a prompt must not contain <ImageHere>")
        return tuple(self.tokenizer.encode(text, bos=i == 0) for i, text in enumerate(segments))

    def contexts(self, image_embeds, prompt):
        """The original's get_context_emb for every image with one prompt: the text segments' embeddings around
        each image's, the start cut off where it is too long. The segments are the same for every image, so
        they are embedded once."""
        embed = self.model.language_model.get_input_embeddings()
        before, after = (embed(to_device_async(torch.tensor(ids), image_embeds.device))
                         .expand(len(image_embeds), -1, -1) for ids in self.segment_ids(prompt))
        contexts = torch.cat([before, image_embeds, after], dim=1)
        return contexts[:, -(MAX_LENGTH - self.generation["max_new_tokens"]):]

    @torch.inference_mode()
    def caption(self, images, prompts):
        pixel_values = stack_to_device(images, self.device).to(self.dtype)
        image_embeds = self.model.encode_images(pixel_values)
        by_prompt = [self.contexts(image_embeds, prompt) for prompt in prompts]
        # rows image-major, left padding: zero embeddings, masked out
        length = max(contexts.shape[1] for contexts in by_prompt)
        inputs = image_embeds.new_zeros(len(images), len(prompts), length, image_embeds.shape[-1])
        mask = torch.zeros(len(images), len(prompts), length, dtype=torch.long, device=self.device)
        for j, contexts in enumerate(by_prompt):
            inputs[:, j, length - contexts.shape[1]:] = contexts
            mask[:, j, length - contexts.shape[1]:] = 1
        inputs, mask = inputs.flatten(0, 1), mask.flatten(0, 1)
        eos = self.tokenizer.eos_id
        self.stop_on_text.start()
        outputs = self.model.language_model.generate(
            inputs_embeds=inputs, attention_mask=mask,
            stopping_criteria=StoppingCriteriaList([self.stop_on_text]),
            logits_processor=LogitsProcessorList([RepetitionPenaltyWithBos(REPETITION_PENALTY, self.tokenizer.bos_id)]),
            bos_token_id=self.tokenizer.bos_id, eos_token_id=eos, pad_token_id=eos, **self.generation,
        )
        captions = [self.answer(row) for row in outputs.tolist()]
        return by_image(captions, prompts)

    def answer(self, ids):
        """Chat.answer's cleaning: decode without special tokens, cut at '###', keep what follows the last
        'Assistant:', strip."""
        ended = self.tokenizer.eos_id in ids
        if ended:
            ids = ids[: ids.index(self.tokenizer.eos_id)]
        text = self.tokenizer.decode(ids)
        ended = ended or STOP in text
        return Caption(text.split(STOP)[0].split("Assistant:")[-1].strip(), truncated=not ended)


if __name__ == "__main__":
    run(MiniGPT4Captioner)
