"""Caption images with InternVL2 (OpenGVLab/InternVL2-1B ... -76B) on current transformers.

The published InternVL2 checkpoints only run as remote code that broke with transformers 4.50. This
script runs none of their .py files: it reads the original folder (config.json with model_type
"internvl_chat", model*.safetensors with the original key names, the tokenizer files) and converts it
while loading into transformers' native InternVLForConditionalGeneration (convert/internvl.py). Folders
already in the native format (model_type "internvl", e.g. written by --convert-to) load as they are.

Everything the original `chat()` does is reproduced: dynamic 448 px tiling with its grid choice and
thumbnail, the conversation template named in the checkpoint with its system message, 256 <IMG_CONTEXT>
tokens per tile, stopping at the template's end token, decoding and stripping of the answer.

    python internvl.py --input-json in.json --model OpenGVLab/InternVL2-8B --prompts detail,noun,main
    python internvl.py --convert-to InternVL2-8B-native --model OpenGVLab/InternVL2-8B
"""
import functools
import json
import os
import re
import sys

import numpy as np
import sentencepiece as spm
from PIL import Image

from utils import prompts as presets
from utils.caption_loop import run
from utils.captioner import Caption, Captioner, by_image, inference_mode, stopped_at_limit
from utils.checkpoints import fetch_folder, read_json
from utils.errors import UserError
from utils.generation.tensors import to_device

# torch, transformers and huggingface_hub are imported where they are used: --help and mistakes answer at once.

TILE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# what a hub id is downloaded with: configs, weights and tokenizer files, none of the remote-code .py files
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]


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
# Model

def load_model(folder, dtype, device, image_token_id, attention="sdpa"):
    """InternVLForConditionalGeneration from an original folder (converted while loading) or a native one."""
    config = read_json(os.path.join(folder, "config.json"))
    if config is None:
        raise UserError(f"{folder} has no config.json")
    model_type = config.get("model_type")
    if model_type == "internvl":
        from transformers import InternVLForConditionalGeneration
        model = InternVLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, device_map=device, attn_implementation=attention)
    elif model_type == "internvl_chat":
        from convert.internvl import load_original
        model = load_original(folder, config, dtype, device, attention)
    else:
        raise UserError(f"{folder} is not an InternVL2 checkpoint (model_type {model_type!r}, "
                        "expected 'internvl_chat' or 'internvl')")
    model.config.image_token_id = image_token_id  # the class default is another model's
    return model.eval()


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

class InternVLCaptioner(Captioner):
    name = "internvl"
    default_model = "OpenGVLab/InternVL2-8B"
    prompts = presets.INTERNVL
    default_prompt = "detail"
    defaults = {"batch_size": 20}  # the original recaptioning script's
    default_dtype = "bfloat16"
    caption_flags = ("max_tiles",)
    refills_rows = True

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("--max-tiles", type=int, default=6,
                            help="most 448 px tiles per image, plus a thumbnail when there are several; 6 as in "
                                 "the original recaptioning script (the checkpoints' own maximum, "
                                 "max_dynamic_patch in config.json, is 12)")
        parser.add_argument("--convert-to", metavar="DIR",
                            help="only convert the --model checkpoint into the native transformers format in DIR, "
                                 "then exit (no --input-json needed); later runs load DIR with plain "
                                 "from_pretrained")

    @classmethod
    def run_instead(cls, model, options):
        """--convert-to DIR: write the --model checkpoint into DIR in the native format, instead of captioning."""
        out_dir = options["convert_to"]
        if out_dir is None:
            return False
        from convert.internvl import convert_checkpoint
        folder = fetch_folder(model, CHECKPOINT_FILES)
        convert_checkpoint(folder, out_dir, load_tokenizer(folder).convert_tokens_to_ids(IMG_CONTEXT))
        print(f"wrote {out_dir}; caption with --model {out_dir}", file=sys.stderr)
        return True

    def __init__(self, settings, device):
        import utils.generation.attention  # noqa: F401  (registers the sdpa_grouped attention implementation)
        max_tiles = settings.options["max_tiles"]
        if max_tiles < 1:
            raise UserError("--max-tiles must be at least 1")
        folder = fetch_folder(settings.model, CHECKPOINT_FILES)
        config = read_json(os.path.join(folder, "config.json"))
        if config is None:
            raise UserError(f"{folder} is not a checkpoint folder (no config.json)")
        self.tokenizer = load_tokenizer(folder)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.model = load_model(folder, settings.dtype, device, self.image_token_id, settings.attn_implementation)
        self.template, self.system_message = chat_format(folder, config)
        if self.template is None:  # a native folder's own end of turn
            eos = self.model.generation_config.eos_token_id
            self.end_token_ids = eos if isinstance(eos, list) else [eos]
        else:
            self.end_token_ids = [self.tokenizer.convert_tokens_to_ids(self.template["sep"].strip())]
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # the original recaptioning script: greedy, one beam
        self.generation = settings.decoding.generate_kwargs(temperature=0.0)
        self.decode_rows = settings.decode_rows
        self.prepare = functools.partial(prepare_image, max_tiles=max_tiles, dtype=settings.dtype)
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
    def caption(self, images, prompts, inputs=None):
        from utils.generation import shared_prefix
        ids, features = self.prompt_inputs(images, prompts)
        self.skip_dynamic_rope_check(max(len(x) for rows in ids for x in rows) + self.generation["max_new_tokens"])
        # with several prompts, the tokens before the question are prefilled once per image
        output = shared_prefix.generate(self.model, ids, features, self.image_token_id, self.pad_token_id,
                                        self.decode_rows, eos_token_id=self.end_token_ids, **self.generation)
        # generate() returns only the new tokens here; one copy to the CPU
        captions = [self.decode(row) for row in output.tolist()]
        return by_image(captions, prompts)


if __name__ == "__main__":
    run(InternVLCaptioner)
