"""Tiny random-weight InternVL2 checkpoints in the ORIGINAL published format.

The folders look like OpenGVLab/InternVL2-* on the hub: config.json with model_type "internvl_chat",
vision_config / llm_config / template / ps_version ..., model.safetensors with the original key names
(vision_model.*, mlp1.*, language_model.*), and the original tokenizer files. No .py files: nothing here
needs remote code.

Variants:
  internlm2        InternVL2-2B/8B layout: InternViT-300M (LayerNorm, qkv bias) + InternLM2
                   (packed wqkv, grouped query attention), sentencepiece tokenizer whose chat
                   tokens are pieces inside the sentencepiece vocabulary, template internlm2-chat
  internlm2-vit6b  InternVL2-26B layout: InternViT-6B style (RMSNorm, qk-norm, no qkv bias) + InternLM2
  qwen2            InternVL2-1B layout: InternViT-300M + Qwen2 (separate q/k/v with bias), byte-level
                   BPE tokenizer in Qwen2's format, template Hermes-2
  internlm2_5      InternVL2.5 layout: as internlm2 (InternLM2.5 loads as InternLM2), template internvl2_5
  qwen2_5          InternVL2.5/InternVL3 layout: as qwen2 (Qwen2.5 loads as Qwen2), template internvl2_5
  qwen3            InternVL3.5 layout: InternViT-300M + Qwen3 (no q/k/v bias, q and k RMSNorms per head, its own
                   head size), Qwen2's tokenizer format, template internvl2_5

Command line (for manual checks):  python tests/internvl_checkpoint.py OUT_DIR [--variant qwen2]
"""
import argparse
import json
import os

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# InternVL2 (internlm2-chat or Hermes-2 template); InternVL2.5 and InternVL3 (the internvl2_5 template): InternLM2.5,
# which loads as InternLM2, and Qwen2.5, which loads as Qwen2; InternVL3.5 (the same template): Qwen3
VARIANTS = ("internlm2", "internlm2-vit6b", "qwen2", "internlm2_5", "qwen2_5", "qwen3")

# What the tiny tokenizers learn from (the prompts of the project plus some caption-like text).
SENTENCES = [
    "Describe the image in detail.",
    "Briefly describe the image with just a few words.",
    "Briefly describe the image in one sentence.",
    "Briefly describe the image with few noun words separated by ','.",
    "Describe the style or your feelings about this image, do not say anything about the objects in the image.",
    "Describe only the background of this image, do not say anything about the foreground objects.",
    "Describe only the one main object in the image, do not say anything about the other objects or background.",
    "A red bus drives down a busy street next to tall buildings.",
    "Two dogs are playing on the green grass in a sunny park.",
    "The photo shows a wooden table with cups, plates and a vase of flowers.",
    "a cat , a dog , a tree ; don't stop , it's fine !",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "system user assistant",
]

INTERNLM2_CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TINY_VISION = {
    "internvit-300m": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           qkv_bias=True, qk_normalization=False, norm_type="layer_norm"),
    "internvit-6b": dict(hidden_size=40, intermediate_size=80, num_attention_heads=5, num_hidden_layers=2,
                         qkv_bias=False, qk_normalization=True, norm_type="rms_norm"),
}
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def _added_token(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_internlm2_tokenizer(out_dir):
    """sentencepiece model with <unk>,<s>,</s> first and the chat tokens as pieces of its own vocabulary
    (as InternLM2's tokenizer.model has them), the InternVL image tokens appended after it."""
    text_file = os.path.join(out_dir, "_sentences.txt")
    with open(text_file, "w") as f:
        f.write("\n".join(SENTENCES * 4) + "\n")
    spm.SentencePieceTrainer.train(
        input=text_file, model_prefix=os.path.join(out_dir, "tokenizer"), model_type="bpe", vocab_size=700, hard_vocab_limit=False,
        user_defined_symbols=INTERNLM2_CHAT_TOKENS, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    os.remove(text_file)
    os.remove(os.path.join(out_dir, "tokenizer.vocab"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
    sp_size = sp.get_piece_size()
    added = {0: "<unk>", 1: "<s>", 2: "</s>"}
    added.update({sp.piece_to_id(t): t for t in INTERNLM2_CHAT_TOKENS})
    added.update({sp_size + i: t for i, t in enumerate(INTERNVL_TOKENS)})
    config = {
        "added_tokens_decoder": {str(i): _added_token(t) for i, t in sorted(added.items())},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"] + INTERNVL_TOKENS,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "tokenizer_class": "InternLM2Tokenizer",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"additional_special_tokens": config["additional_special_tokens"], "bos_token": "<s>",
                   "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
    with open(os.path.join(out_dir, "added_tokens.json"), "w") as f:
        json.dump({t: sp_size + i for i, t in enumerate(INTERNVL_TOKENS)}, f, indent=2)
    return sp_size + len(INTERNVL_TOKENS), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def write_qwen2_tokenizer(out_dir):
    """Byte-level BPE in Qwen2's tokenizer.json layout, <|endoftext|>/<|im_start|>/<|im_end|> right after the
    learned vocabulary and the InternVL image tokens after those (as in InternVL2-1B)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    tokenizer.add_special_tokens(QWEN2_SPECIAL_TOKENS + INTERNVL_TOKENS)
    tokenizer_json = json.loads(tokenizer.to_str())
    # merges as "a b" strings, as in the published file (and readable by the tokenizers of transformers 4.x)
    tokenizer_json["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False, indent=2)
    tokenizer.model.save(out_dir)  # vocab.json, merges.txt like the published folder
    ids = {t: tokenizer.token_to_id(t) for t in QWEN2_SPECIAL_TOKENS + INTERNVL_TOKENS}
    config = {
        "added_tokens_decoder": {str(i): _added_token(t) for t, i in ids.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + INTERNVL_TOKENS,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "chat_template": None, "clean_up_tokenization_spaces": False, "errors": "replace",
        "model_max_length": 8192, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tokenizer.get_vocab_size(), {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}


def build_config(variant, vocab_size, token_ids):
    vision = TINY_VISION["internvit-6b" if variant == "internlm2-vit6b" else "internvit-300m"]
    vision_config = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "image_size": 448, "patch_size": 14,
        "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "dropout": 0.0, "drop_path_rate": 0.0,
        "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "use_flash_attn": True,
        **vision,
    }
    if variant.startswith("internlm2"):
        llm_config = {
            "_name_or_path": "internlm/internlm2_5-7b-chat", "architectures": ["InternLM2ForCausalLM"],
            "attn_implementation": "flash_attention_2", "model_type": "internlm2", "bias": False,
            "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": 1000000,
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM"},
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": vocab_size,
            **TINY_LLM, **token_ids,
        }
        template = "internlm2-chat"
    else:
        llm_config = {
            "_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "architectures": ["Qwen2ForCausalLM"],
            "attn_implementation": "flash_attention_2", "model_type": "qwen2", "hidden_act": "silu",
            "max_position_embeddings": 32768, "max_window_layers": 24, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": vocab_size,
            **TINY_LLM, **token_ids,
        }
        template = "Hermes-2"
    if variant == "qwen3":  # InternVL3.5: Qwen3, its head size its own, no q/k/v biases, q and k normed per head
        llm_config.update(_name_or_path="Qwen/Qwen3-8B", architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                          head_dim=32, attention_bias=False, max_position_embeddings=40960, sliding_window=None)
        del llm_config["max_window_layers"]
    if variant in ("internlm2_5", "qwen2_5", "qwen3"):
        template = "internvl2_5"
        llm_config["_name_or_path"] = {"internlm2_5": "internlm/internlm2_5-7b-chat",
                                       "qwen2_5": "Qwen/Qwen2.5-7B-Instruct", "qwen3": "Qwen/Qwen3-8B"}[variant]
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat", "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 448,
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1,
        "template": template, "torch_dtype": "bfloat16", "use_backbone_lora": 0, "use_llm_lora": 0,
        "use_thumbnail": True, "vision_config": vision_config, "llm_config": llm_config,
    }


def random_state_dict(config, seed=0, device="cpu"):
    """Original InternVLChatModel key names. Weights are larger than a usual init so that greedy decoding
    of the tiny model has clear winners (no near-ties that float noise could flip). `device`: where they are drawn
    (bench/multi_gpu.py draws a real-size one on the GPU)."""
    generator = torch.Generator(device).manual_seed(seed)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=generator, device=device) * std

    def norm_weight(n):
        return 1.0 + rand(n, std=0.1)

    v, l = config["vision_config"], config["llm_config"]
    vd, vi, ld, li = v["hidden_size"], v["intermediate_size"], l["hidden_size"], l["intermediate_size"]
    num_patches = (v["image_size"] // v["patch_size"]) ** 2
    sd = {
        "vision_model.embeddings.class_embedding": rand(1, 1, vd),
        "vision_model.embeddings.patch_embedding.weight": rand(vd, 3, v["patch_size"], v["patch_size"], std=0.05),
        "vision_model.embeddings.patch_embedding.bias": rand(vd),
        "vision_model.embeddings.position_embedding": rand(1, num_patches + 1, vd),
    }
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        sd[p + "ls1"] = rand(vd, std=0.5)
        sd[p + "ls2"] = rand(vd, std=0.5)
        sd[p + "attn.qkv.weight"] = rand(3 * vd, vd)
        if v["qkv_bias"]:
            sd[p + "attn.qkv.bias"] = rand(3 * vd)
        if v["qk_normalization"]:
            sd[p + "attn.q_norm.weight"] = norm_weight(vd)
            sd[p + "attn.k_norm.weight"] = norm_weight(vd)
        sd[p + "attn.proj.weight"] = rand(vd, vd)
        sd[p + "attn.proj.bias"] = rand(vd)
        sd[p + "mlp.fc1.weight"] = rand(vi, vd)
        sd[p + "mlp.fc1.bias"] = rand(vi)
        sd[p + "mlp.fc2.weight"] = rand(vd, vi)
        sd[p + "mlp.fc2.bias"] = rand(vd)
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = norm_weight(vd)
            if v["norm_type"] == "layer_norm":
                sd[p + norm + ".bias"] = rand(vd, std=0.1)
    shuffled = vd * 4
    sd.update({
        "mlp1.0.weight": norm_weight(shuffled), "mlp1.0.bias": rand(shuffled, std=0.1),
        "mlp1.1.weight": rand(ld, shuffled), "mlp1.1.bias": rand(ld),
        "mlp1.3.weight": rand(ld, ld), "mlp1.3.bias": rand(ld),
    })
    heads, kv_heads = l["num_attention_heads"], l["num_key_value_heads"]
    head_dim = l.get("head_dim") or ld // heads
    qwen3 = l["architectures"][0] == "Qwen3ForCausalLM"  # no q/k/v biases; q and k RMSNorms per head
    vocab = l["vocab_size"]
    if l["architectures"][0] == "InternLM2ForCausalLM":
        sd["language_model.model.tok_embeddings.weight"] = rand(vocab, ld, std=1.0)
        for i in range(l["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            sd[p + "attention.wqkv.weight"] = rand((heads + 2 * kv_heads) * head_dim, ld)
            sd[p + "attention.wo.weight"] = rand(ld, heads * head_dim)
            sd[p + "feed_forward.w1.weight"] = rand(li, ld)
            sd[p + "feed_forward.w3.weight"] = rand(li, ld)
            sd[p + "feed_forward.w2.weight"] = rand(ld, li)
            sd[p + "attention_norm.weight"] = norm_weight(ld)
            sd[p + "ffn_norm.weight"] = norm_weight(ld)
        sd["language_model.model.norm.weight"] = norm_weight(ld)
        sd["language_model.output.weight"] = rand(vocab, ld, std=1.0)
    else:
        sd["language_model.model.embed_tokens.weight"] = rand(vocab, ld, std=1.0)
        for i in range(l["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            for name, size in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                               ("v_proj", kv_heads * head_dim)):
                sd[p + f"self_attn.{name}.weight"] = rand(size, ld)
                if not qwen3:
                    sd[p + f"self_attn.{name}.bias"] = rand(size)
            if qwen3:
                sd[p + "self_attn.q_norm.weight"] = norm_weight(head_dim)
                sd[p + "self_attn.k_norm.weight"] = norm_weight(head_dim)
            sd[p + "self_attn.o_proj.weight"] = rand(ld, heads * head_dim)
            sd[p + "mlp.gate_proj.weight"] = rand(li, ld)
            sd[p + "mlp.up_proj.weight"] = rand(li, ld)
            sd[p + "mlp.down_proj.weight"] = rand(ld, li)
            sd[p + "input_layernorm.weight"] = norm_weight(ld)
            sd[p + "post_attention_layernorm.weight"] = norm_weight(ld)
        sd["language_model.model.norm.weight"] = norm_weight(ld)
        sd["language_model.lm_head.weight"] = rand(vocab, ld, std=1.0)
    return sd


# A piece the seed-0 tiny models of these variants emit often (found by running them).
FREQUENT_PIECE = {"internlm2": "联", "qwen2": "\x1a"}


def make_end_token_likely(state_dict, variant, token_ids_of):
    """Give the end token (<|im_end|>) the output row of a frequent piece, slightly larger: wherever that piece
    would win, the answer ends instead, so that some answers end before max_new_tokens."""
    key = "language_model.output.weight" if variant.startswith("internlm2") else "language_model.lm_head.weight"
    frequent, end = token_ids_of(FREQUENT_PIECE[variant]), token_ids_of("<|im_end|>")
    state_dict[key][end] = 1.1 * state_dict[key][frequent]


def build_checkpoint(out_dir, variant="internlm2", seed=0, early_end=False):
    """Write a tiny original-format InternVL2 checkpoint folder and return its path. early_end: answers end
    early at times (see make_end_token_likely; internlm2 and qwen2 only)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    os.makedirs(out_dir, exist_ok=True)
    if variant.startswith("internlm2"):
        vocab_size, token_ids = write_internlm2_tokenizer(out_dir)
    else:
        vocab_size, token_ids = write_qwen2_tokenizer(out_dir)
    config = build_config(variant, vocab_size, token_ids)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "transformers_version": "4.37.2"}, f)
    # bfloat16 on disk as published; the tests load in float32 (exact upcast)
    state_dict = random_state_dict(config, seed)
    if early_end:
        if variant.startswith("internlm2"):
            sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
            make_end_token_likely(state_dict, variant, sp.piece_to_id)
        else:
            tokenizer = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
            make_end_token_likely(state_dict, variant, lambda piece: tokenizer.encode(piece).ids[0])
    state_dict = {k: t.to(torch.bfloat16).contiguous() for k, t in state_dict.items()}
    save_file(state_dict, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the checkpoint into")
    parser.add_argument("--variant", choices=VARIANTS, default="internlm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--early-end", action="store_true", help="make the end token likely (internlm2, qwen2)")
    args = parser.parse_args()
    print(build_checkpoint(args.out_dir, args.variant, args.seed, args.early_end))
