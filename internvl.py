"""Caption images with InternVL2 (OpenGVLab/InternVL2-1B ... -76B) on current transformers.

The published InternVL2 checkpoints only run as remote code that broke with transformers 4.50. This
script runs none of their .py files: it reads the original folder (config.json with model_type
"internvl_chat", model*.safetensors with the original key names, the tokenizer files) and converts it
while loading into transformers' native InternVLForConditionalGeneration. Folders already in the native
format (model_type "internvl", e.g. written by --convert-to) load as they are.

Everything the original `chat()` does is reproduced: dynamic 448 px tiling with its grid choice and
thumbnail, the conversation template named in the checkpoint with its system message, 256 <IMG_CONTEXT>
tokens per tile, stopping at the template's end token, decoding and stripping of the answer.

    python internvl.py --input-json in.json --model OpenGVLab/InternVL2-8B --prompts detail,noun,main
    python internvl.py --convert-to InternVL2-8B-native --model OpenGVLab/InternVL2-8B
"""
import argparse
import functools
import glob
import json
import os
import re
import shutil
import sys

import numpy as np
import sentencepiece as spm
from PIL import Image
from safetensors import safe_open

from utils.captioning import (Caption, UserError, by_image, generation_kwargs, inference_mode, run, stopped_at_limit,
                               to_device)

# torch, transformers and huggingface_hub are imported where they are used: --help and mistakes answer at once.

TILE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# The seven prompts of the original multi-perspective recaptioning.
PROMPTS = {
    "detail": "Describe the image in detail.",
    "short": "Briefly describe the image with just a few words.",
    "sentence": "Briefly describe the image in one sentence.",
    "noun": "Briefly describe the image with few noun words separated by ','.",
    "style": "Describe the style or your feelings about this image, do not say anything about the objects in the image.",
    "background": "Describe only the background of this image, do not say anything about the foreground objects.",
    "main": "Describe only the one main object in the image, do not say anything about the other objects or background.",
}

# The conversation templates InternVL2 checkpoints name in their config (InternVL's conversation.py). All
# are its "MPT" separator style: system + sep, then role + message + sep per turn, the open turn as role only.
INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
CHATML = dict(system="<|im_start|>system\n{}", user="<|im_start|>user\n", assistant="<|im_start|>assistant\n")
TEMPLATES = {
    "internlm2-chat": dict(CHATML, system_message=INTERNVL_SYSTEM, sep="<|im_end|>"),
    "Hermes-2": dict(CHATML, system_message=INTERNVL_SYSTEM, sep="<|im_end|>"),
    "phi3-chat": dict(system="<|system|>\n{}", user="<|user|>\n", assistant="<|assistant|>\n",
                      system_message=INTERNVL_SYSTEM, sep="<|end|>"),
    "internvl2_5": dict(CHATML, sep="<|im_end|>\n", system_message=(
        "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")),
}


def read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing (runs in DataLoader workers)

def tile_grid(width, height, max_tiles, tile_size=TILE_SIZE):
    """(columns, rows) of the tiling the original dynamic_preprocess picks for an image of this size."""
    aspect_ratio = width / height
    # Same candidate order as the original (a set sorted by area): the tie-break below depends on it.
    grids = sorted({(i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if i * j <= max_tiles}, key=lambda grid: grid[0] * grid[1])
    best_diff, best = float("inf"), (1, 1)
    for columns, rows in grids:
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best_diff, best = diff, (columns, rows)
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)  # equally close: the larger grid wins when the image is big enough
    return best


def to_tensor(image):
    """ToTensor + ImageNet Normalize, in float32 as torchvision does."""
    import torch
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels.sub(mean).div(std)


def prepare_image(image, max_tiles, dtype=None):
    """PIL image -> tensor (tiles, 3, 448, 448), normalised in float32 and then cast to `dtype`, the model's (as the
    original casts before the vision tower; here in the worker, so that half the bytes go to the GPU): the tiles
    row by row, then the thumbnail if more than one tile. PIL resizes with bicubic as the original (PIL's
    default; its torchvision Resize is a no-op on 448 px tiles)."""
    import torch
    image = image.convert("RGB")
    columns, rows = tile_grid(*image.size, max_tiles)
    resized = image.resize((columns * TILE_SIZE, rows * TILE_SIZE), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * TILE_SIZE, r * TILE_SIZE, (c + 1) * TILE_SIZE, (r + 1) * TILE_SIZE))
             for r in range(rows) for c in range(columns)]
    if len(tiles) > 1:
        tiles.append(image.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC))
    tiles = torch.stack([to_tensor(tile) for tile in tiles])
    return tiles if dtype is None else tiles.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

class InternLM2Tokenizer:
    """InternLM2's tokenizer (sentencepiece) without its remote code, giving the ids and texts the original
    InternLM2Tokenizer gives on transformers 4.x.

    Its chat tokens (<|im_start|>, <|im_end|>, ...) are pieces inside the sentencepiece vocabulary and the
    InternVL tokens (<img>, <IMG_CONTEXT>, ...) are appended after it; transformers first splits the text at
    all of these added tokens and sentencepiece encodes each piece in between on its own."""

    def __init__(self, folder):
        self.sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            config = json.load(f)
        self.added = {token["content"]: (int(i), token) for i, token in config.get("added_tokens_decoder", {}).items()}
        for token, i in read_json(os.path.join(folder, "added_tokens.json"), {}).items():
            self.added.setdefault(token, (i, {"content": token}))
        self.add_bos = config.get("add_bos_token", True)
        special = [config.get(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")]
        special = [t["content"] if isinstance(t, dict) else t
                   for t in special + config.get("additional_special_tokens", []) if t]
        self.special_ids = {self.convert_tokens_to_ids(t) for t in special}
        # added tokens that are not special stay in the text, as separate words
        self.plain_added = {i: token for token, (i, _) in self.added.items() if token not in special}
        self.pad_token_id = self.convert_tokens_to_ids(config.get("pad_token") or "</s>")
        # longest first, so that a token that is a prefix of another cannot split it
        tokens = sorted(self.added, key=len, reverse=True)
        self.split_pattern = re.compile("(" + "|".join(map(re.escape, tokens)) + ")")

    def convert_tokens_to_ids(self, token):
        return self.added[token][0] if token in self.added else self.sp.piece_to_id(token)

    def encode(self, text):
        parts = self.split_pattern.split(text)
        for k in range(1, len(parts), 2):  # the added tokens' lstrip/rstrip flags eat the neighbouring spaces
            token = self.added[parts[k]][1]
            if token.get("lstrip"):
                parts[k - 1] = parts[k - 1].rstrip()
            if token.get("rstrip"):
                parts[k + 1] = parts[k + 1].lstrip()
        ids = [self.sp.bos_id()] if self.add_bos else []
        for k, part in enumerate(parts):
            ids += [self.added[part][0]] if k % 2 else self.sp.encode(part)
        return ids

    def decode(self, ids, skip_special_tokens=True):
        """As the original with skip_special_tokens=True (transformers 4.x): special tokens dropped, runs of
        pieces decoded by sentencepiece and cleaned up (" ," -> "," and so on, which InternLM2Tokenizer always
        did), non-special added tokens kept as words, all joined by spaces."""
        if not skip_special_tokens:
            raise ValueError("only skip_special_tokens=True is supported")
        texts, pieces = [], []
        for i in ids:
            if i in self.special_ids:
                continue
            if i in self.plain_added:
                if pieces and self._decode_pieces(pieces):
                    texts.append(self._decode_pieces(pieces))
                texts.append(self.plain_added[i])
                pieces = []
            else:
                pieces.append(i)
        if pieces:
            texts.append(self._decode_pieces(pieces))
        return " ".join(texts)

    def _decode_pieces(self, ids):
        text = self.sp.decode(ids)
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text


def load_tokenizer(folder):
    """The checkpoint's tokenizer by the class its tokenizer_config.json names: our InternLM2Tokenizer for
    InternLM2's remote class, transformers' own class otherwise (by name, so that nothing looks at the
    checkpoint's remote-code entries)."""
    config = read_json(os.path.join(folder, "tokenizer_config.json"))
    if config is None:
        raise UserError(f"{folder} has no tokenizer_config.json")
    import transformers
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class == "InternLM2Tokenizer":
        return InternLM2Tokenizer(folder)
    if not hasattr(transformers, tokenizer_class or ""):
        raise UserError(f"{folder}: unknown tokenizer class {tokenizer_class!r}")
    return getattr(transformers, tokenizer_class).from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint conversion: original InternVL2 (model_type "internvl_chat") -> InternVLForConditionalGeneration

# llm_config keys that carry over to the native text config; the rest are remote-code or 4.x leftovers
# (auto_map, attn_implementation: flash_attention_2, ...). Rope settings are handled on their own.
TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                    "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias",
                    "use_sliding_window", "sliding_window", "max_window_layers",
                    "original_max_position_embeddings", "partial_rotary_factor")
TEXT_CONFIG_CLASSES = {"InternLM2ForCausalLM": "LlamaConfig", "LlamaForCausalLM": "LlamaConfig",
                       "Qwen2ForCausalLM": "Qwen2Config", "Phi3ForCausalLM": "Phi3Config"}  # transformers' names


def rope_parameters(llm_config):
    """transformers 5's rope_parameters from the 4.x rope_theta and rope_scaling ({"type": ...} or
    {"rope_type": ...})."""
    scaling = dict(llm_config.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)  # Phi-3's old name for LongRoPE
    return {"rope_type": rope_type, "rope_theta": llm_config.get("rope_theta", 10000.0), **scaling}


def native_config(original):
    """InternVLConfig from an original internvl_chat config.json (as a dict)."""
    import transformers
    from transformers import InternVLConfig, InternVLVisionConfig
    if original.get("ps_version", "v1") != "v2":
        raise UserError("only ps_version v2 checkpoints are supported (all InternVL2 releases); "
                        f"this one has {original.get('ps_version', 'v1')!r}")
    vision, llm = original["vision_config"], original["llm_config"]
    architecture = llm["architectures"][0]
    if architecture not in TEXT_CONFIG_CLASSES:
        raise UserError(f"unsupported language model {architecture}; known: {', '.join(TEXT_CONFIG_CLASSES)}")
    image_size = original.get("force_image_size") or vision["image_size"]
    if image_size != vision["image_size"]:
        raise UserError(f"force_image_size {image_size} differs from the vision tower's {vision['image_size']}")
    text = {k: llm[k] for k in TEXT_CONFIG_KEYS if k in llm}
    if architecture == "InternLM2ForCausalLM":
        text.update(attention_bias=llm.get("bias", True), mlp_bias=False)  # InternLM2's bias is only wqkv/wo
    text_config = getattr(transformers, TEXT_CONFIG_CLASSES[architecture])(
        **text, rope_parameters=rope_parameters(llm), tie_word_embeddings=False)
    vision_config = InternVLVisionConfig(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
        attention_bias=vision.get("qkv_bias", False), use_qk_norm=vision.get("qk_normalization", False),
        norm_type=vision.get("norm_type", "rms_norm"), layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        hidden_act=vision.get("hidden_act", "gelu"), image_size=image_size, patch_size=vision["patch_size"],
        num_channels=vision.get("num_channels", 3),
        use_mean_pooling=True,  # = no final LayerNorm, as InternViT has none
        use_absolute_position_embeddings=True)
    return InternVLConfig(
        vision_config=vision_config, text_config=text_config,
        downsample_ratio=original.get("downsample_ratio", 0.5),
        vision_feature_layer=original.get("select_layer", -1),
        image_seq_length=int((image_size // vision["patch_size"]) ** 2 * original.get("downsample_ratio", 0.5) ** 2),
        tie_word_embeddings=False,  # InternVLConfig defaults to True whatever the text config says
        architectures=["InternVLForConditionalGeneration"],
        # kept so that a converted folder still knows the original chat format
        template=original.get("template"),
        **({"system_message": original["system_message"]} if "system_message" in original else {}))


VISION_KEY_RENAMES = [
    (r"^vision_model\.", "model.vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
PROJECTOR_KEY_RENAMES = [(r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
                         (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
                         (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2.")]
INTERNLM2_KEY_RENAMES = [
    (r"^language_model\.model\.tok_embeddings\.", "model.language_model.embed_tokens."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.output\.", "lm_head."),
    (r"\.attention\.wqkv\.", ".self_attn.qkv."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]
HF_LLM_KEY_RENAMES = [(r"^language_model\.model\.", "model.language_model."),
                      (r"^language_model\.lm_head\.", "lm_head.")]


def convert_key(key, architecture):
    if key.startswith("vision_model."):
        renames = VISION_KEY_RENAMES
    elif key.startswith("mlp1."):
        renames = PROJECTOR_KEY_RENAMES
    elif key.startswith("language_model."):
        renames = INTERNLM2_KEY_RENAMES if architecture == "InternLM2ForCausalLM" else HF_LLM_KEY_RENAMES
    else:
        raise UserError(f"unexpected weight {key!r} in an InternVL2 checkpoint")
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def split_qkv(key, tensor, config):
    """Packed qkv -> q_proj, k_proj, v_proj. The ViT packs [q; k; v]; InternLM2's wqkv packs per key-value
    head: that head's group of queries, then its key, then its value."""
    if ".attention.qkv." in key:  # vision tower
        return dict(zip((key.replace(".qkv.", f".{p}_proj.") for p in "qkv"), tensor.chunk(3)))
    text = config.text_config
    groups = text.num_attention_heads // text.num_key_value_heads
    head_dim = text.head_dim
    packed = tensor.reshape(text.num_key_value_heads, groups + 2, head_dim, *tensor.shape[1:])
    q = packed[:, :groups].reshape(-1, *tensor.shape[1:])
    k = packed[:, groups].reshape(-1, *tensor.shape[1:])
    v = packed[:, groups + 1].reshape(-1, *tensor.shape[1:])
    return dict(zip((key.replace(".qkv.", f".{p}_proj.") for p in "qkv"), (q, k, v)))


def convert_state_dict(folder, config, architecture):
    """Read the original weights (one or several safetensors files) into native key names."""
    files = sorted(glob.glob(os.path.join(folder, "model*.safetensors")))
    if not files:
        raise UserError(f"no model*.safetensors in {folder} (InternVL2 .bin checkpoints are not supported)")
    state_dict = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                new_key = convert_key(key, architecture)
                tensor = f.get_tensor(key)
                if ".qkv." in new_key:
                    state_dict.update(split_qkv(new_key, tensor, config))
                else:
                    state_dict[new_key] = tensor
    return state_dict


def load_model(folder, dtype, device, image_token_id, attention="sdpa"):
    """InternVLForConditionalGeneration from an original or a native folder."""
    from transformers import InternVLForConditionalGeneration
    config = read_json(os.path.join(folder, "config.json"))
    if config is None:
        raise UserError(f"{folder} has no config.json")
    model_type = config.get("model_type")
    if model_type == "internvl":
        model = InternVLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, device_map=device, attn_implementation=attention)
    elif model_type == "internvl_chat":
        native = native_config(config)
        state_dict = convert_state_dict(folder, native, config["llm_config"]["architectures"][0])
        model, info = InternVLForConditionalGeneration.from_pretrained(
            None, config=native, state_dict=state_dict, dtype=dtype, device_map=device,
            attn_implementation=attention, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            raise UserError(f"{folder}: weights do not match its config (missing "
                            f"{sorted(info['missing_keys'])[:3]}, unexpected {sorted(info['unexpected_keys'])[:3]})")
    else:
        raise UserError(f"{folder} is not an InternVL2 checkpoint (model_type {model_type!r}, "
                        "expected 'internvl_chat' or 'internvl')")
    model.config.image_token_id = image_token_id  # the class default is another model's
    return model.eval()


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def convert_checkpoint(folder, out_dir):
    """Write an original InternVL2 checkpoint in the native format (weights in the checkpoint's dtype, the
    original tokenizer files, the chat template name kept in config.json)."""
    config = read_json(os.path.join(folder, "config.json"), {})
    if config.get("model_type") != "internvl_chat":
        raise UserError(f"{folder} is not an original InternVL2 checkpoint (model_type internvl_chat)")
    if os.path.exists(os.path.join(out_dir, "config.json")):
        raise UserError(f"{out_dir} already holds a checkpoint")
    import torch
    tokenizer = load_tokenizer(folder)
    dtype = getattr(torch, config.get("torch_dtype") or "bfloat16")
    model = load_model(folder, dtype, "cpu", tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), out_dir)
    return out_dir


def resolve_checkpoint(name):
    """A local folder, or a hub id downloaded without any of its .py files."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.startswith((".", "/")):
        raise UserError(f"checkpoint folder {name} not found")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    except Exception as e:
        raise UserError(f"cannot find checkpoint {name}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Prompt

def chat_format(folder, config):
    """(template dict, system message) of a checkpoint: the template its config names (folders written by
    --convert-to keep the name), the system message the config may override. (None, None) for native folders
    from elsewhere (OpenGVLab's *-hf): they are prompted with their tokenizer's own chat template."""
    name = config.get("template")
    if name is None and config.get("model_type") == "internvl":
        return None, None
    if name not in TEMPLATES:
        raise UserError(f"{folder}: unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    return template, config.get("system_message", template["system_message"])


def render_prompt(question, tiles, image_tokens_per_tile, template, system_message, tokenizer):
    """The query string the original chat() tokenizes for one image and one question."""
    if "<image>" not in question:
        question = "<image>\n" + question
    if template is None:
        query = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=False)
    else:
        sep = template["sep"]
        query = (template["system"].format(system_message) + sep + template["user"] + question + sep
                 + template["assistant"])
    return query.replace("<image>", IMG_START + IMG_CONTEXT * image_tokens_per_tile * tiles + IMG_END, 1)


# ---------------------------------------------------------------------------------------------------------
# Captioner

class InternVLCaptioner:
    name = "internvl"
    default_model = "OpenGVLab/InternVL2-8B"
    prompts = PROMPTS
    default_prompt = "detail"
    defaults = {"batch_size": 20}  # the seed's
    default_dtype = "bfloat16"
    caption_flags = ("max_tiles",)
    refills_rows = True

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--max-tiles", type=int, default=6,
                            help="most 448 px tiles per image, plus a thumbnail when there are several; 6 as in "
                                 "the original recaptioning script (the checkpoints' own maximum, "
                                 "max_dynamic_patch in config.json, is 12)")
        # handled in main() before the captioning command line; listed here for --help
        parser.add_argument("--convert-to", metavar="DIR",
                            help="only convert the --model checkpoint into the native transformers format in DIR, "
                                 "then exit (no --input-json needed); later runs load DIR with plain "
                                 "from_pretrained")

    def __init__(self, args, device):
        import utils.attention  # noqa: F401  (registers the sdpa_grouped attention implementation)
        if args.max_tiles < 1:
            raise UserError("--max-tiles must be at least 1")
        folder = resolve_checkpoint(args.model)
        config = read_json(os.path.join(folder, "config.json"))
        if config is None:
            raise UserError(f"{folder} is not a checkpoint folder (no config.json)")
        self.tokenizer = load_tokenizer(folder)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.model = load_model(folder, args.dtype, device, self.image_token_id, args.attn_implementation)
        self.template, self.system_message = chat_format(folder, config)
        if self.template is None:  # a native folder's own end of turn
            eos = self.model.generation_config.eos_token_id
            self.end_token_ids = eos if isinstance(eos, list) else [eos]
        else:
            self.end_token_ids = [self.tokenizer.convert_tokens_to_ids(self.template["sep"].strip())]
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.generation = generation_kwargs(args, temperature=0.0)  # the seed: greedy, one beam
        self.decode_rows = args.decode_rows
        self.prepare = functools.partial(prepare_image, max_tiles=args.max_tiles, dtype=args.dtype)
        # a few (prompt, tiles) pairs recur in every batch: tokenize each once (its ~1,800 image tokens too)
        self.prompt_ids = functools.lru_cache(maxsize=1024)(self.prompt_ids)
        self.dynamic_ropes = [m for m in self.model.modules() if getattr(m, "rope_type", None) == "dynamic"]

    def skip_dynamic_rope_check(self, longest):
        """InternLM2's dynamic NTK rope equals the plain one until a sequence passes max_position_embeddings,
        but checks the length at every step by reading a GPU value on the CPU, which a decode step recorded as
        a CUDA graph cannot do. When no sequence of this call gets that long, skip the check; when one does
        (or did: its frequencies changed), keep it."""
        for rope in self.dynamic_ropes:
            plain = longest <= rope.original_max_seq_len and rope.max_seq_len_cached == rope.original_max_seq_len
            rope.rope_type = "default" if plain else "dynamic"

    def cost(self, tiles):
        return len(tiles)  # the prompt length grows with the number of tiles

    def prompt_ids(self, question, tiles):
        query = render_prompt(question, tiles, self.model.config.image_seq_length, self.template,
                              self.system_message, self.tokenizer)
        return self.tokenizer.encode(query)

    def decode(self, new_tokens):
        """The answer as the original gives it: special tokens dropped, cut at the end token (and at its text),
        stripped."""
        truncated = stopped_at_limit(new_tokens, self.end_token_ids)
        if not truncated:
            new_tokens = new_tokens[:min(new_tokens.index(end) for end in self.end_token_ids if end in new_tokens)]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        if self.template is not None:
            text = text.split(self.template["sep"].strip())[0]
        return Caption(text.strip(), truncated)

    def prompt_inputs(self, images, prompts):
        """(token ids of every image with every prompt, image features of every image): the vision tower runs once
        per image, and its features fill the image tokens of all its prompts."""
        features = self.model.get_image_features(
            pixel_values=to_device(images, self.model.device),
            vision_feature_layer=self.model.config.vision_feature_layer,
            vision_feature_select_strategy="default").pooler_output
        features = [tiles.flatten(0, 1) for tiles in features.split([len(tiles) for tiles in images])]
        return [[self.prompt_ids(prompt, len(tiles)) for prompt in prompts] for tiles in images], features

    @inference_mode
    def caption(self, images, prompts):
        from utils import shared_prefix
        ids, features = self.prompt_inputs(images, prompts)
        self.skip_dynamic_rope_check(max(len(x) for rows in ids for x in rows) + self.generation["max_new_tokens"])
        # with several prompts, the tokens before the question are prefilled once per image
        output = shared_prefix.generate(self.model, ids, features, self.image_token_id, self.pad_token_id,
                                        self.decode_rows, eos_token_id=self.end_token_ids, **self.generation)
        # generate() returns only the new tokens here; one copy to the CPU
        captions = [self.decode(row) for row in output.tolist()]
        return by_image(captions, prompts)


def convert_command():
    """python internvl.py --convert-to DIR --model CKPT"""
    parser = argparse.ArgumentParser(prog="internvl.py --convert-to",
                                     description="Convert an original InternVL2 checkpoint into the native format.")
    parser.add_argument("--convert-to", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--model", default=InternVLCaptioner.default_model, help="original checkpoint: hub id or folder")
    args = parser.parse_args()
    try:
        convert_checkpoint(resolve_checkpoint(args.model), args.convert_to)
    except UserError as e:
        print(f"internvl.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.convert_to}; caption with --model {args.convert_to}", file=sys.stderr)


if __name__ == "__main__":
    if "--convert-to" in sys.argv[1:]:
        convert_command()
    else:
        run(InternVLCaptioner)
