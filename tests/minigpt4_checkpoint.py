"""Tiny random-weight MiniGPT-4 files in the formats MiniGPT-4 users have on disk.

    eva_vit_g.pth                       EVA ViT-g state dict, LAVIS names, one block more than MiniGPT-4 keeps
    blip2_pretrained_flant5xxl.pth      {"model": ...}: Qformer.bert.*, query_tokens, ln_vision.*, t5_proj.*, ...
    pretrained_minigpt4.pth             {"model": {llama_proj.*}, ...}        (Vicuna v0, with Q-Former)
    pretrained_minigpt4_llama2_7b.pth   {"model": {llama_proj.*}, ...}        (Llama-2, no Q-Former)
    vicuna/                             Llama folder in HF format with only tokenizer.model (as Vicuna v0 has)
    llama2/                             Llama folder in HF format with tokenizer.model and tokenizer_config.json
    blip2-hf/                           BLIP-2 folder in transformers format (vision_model.*, qformer.*, query_tokens)
    repo/eval_configs/minigpt4_eval.yaml, repo/eval_configs/minigpt4_llama2_eval.yaml,
    repo/minigpt4/configs/models/minigpt4_{vicuna0,llama2}.yaml
                                        the original eval and model configs, pointing at the files above
    torch_home/hub/checkpoints/         eva_vit_g.pth and blip2_pretrained_flant5xxl.pth where the original's
                                        download cache keeps them (TORCH_HOME=<root>/torch_home)

The sizes follow the original's rules: ViT heads = width // 88, Q-Former heads = width // 64, cross-attention
every 2nd Q-Former layer, MiniGPT-4 keeps all ViT blocks but the last. `dims.json` lists them.

CLI: python tests/minigpt4_checkpoint.py OUT_DIR
"""
import io
import json
import os
import re
import shutil
import sys

import sentencepiece
import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

DIMS = {
    "vit_width": 176,  # 2 heads of 88, as EVA ViT-g (1408 = 16 x 88)
    "vit_blocks_in_file": 3,  # MiniGPT-4 keeps the first 2
    "vit_mlp": int(176 * 4.3637),
    "patch_size": 14,
    "image_size": 224,
    "qformer_width": 128,  # 2 heads of 64, as BERT-base (768 = 12 x 64)
    "qformer_layers": 2,
    "qformer_mlp": 256,
    "num_query_tokens": 32,
    "llm_width": 64,
    "llm_layers": 2,
    "llm_heads": 4,
    "llm_mlp": 128,
}

SENTENCES = [
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
    "to you. Please answer my questions.###Human: <Img><ImageHere></Img> Describe image content in English in "
    "detail:###Assistant: ",
    "<s>[INST] <Img><ImageHere></Img> Describe image content in English in detail: [/INST] ",
    "A dog runs across a green field while a child throws a red ball.",
    "Two people sit on a wooden bench near the lake at sunset.",
    "The kitchen has white cabinets, a steel sink and a bowl of fruit on the table.",
    "A city street at night with cars, bright signs and people walking in the rain.",
    "###Assistant: The image shows a cat sleeping on a sofa. ###Human: What color is it? ###",
    "Numbers like 2023 and 42 appear on the sign; the price is $5.",
]


def train_tokenizer(path):
    """A sentencepiece BPE model with LLaMA's settings (byte fallback, dummy prefix, no normalization)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=model, model_type="bpe", vocab_size=420,
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_file=path).vocab_size()


def randn(*shape, std=0.1, mean=0.0):
    return torch.randn(*shape) * std + mean


def linear(state, name, n_out, n_in, bias=True):
    state[f"{name}.weight"] = randn(n_out, n_in, std=n_in ** -0.5)
    if bias:
        state[f"{name}.bias"] = randn(n_out)


def layer_norm(state, name, n):
    state[f"{name}.weight"] = randn(n, mean=1.0)
    state[f"{name}.bias"] = randn(n)


def eva_vit_state():
    """EVA ViT-g state dict as in eva_vit_g.pth (no prefix, q_bias/v_bias, no layer scale)."""
    d, mlp, p = DIMS["vit_width"], DIMS["vit_mlp"], DIMS["patch_size"]
    positions = (DIMS["image_size"] // p) ** 2 + 1
    state = {"cls_token": randn(1, 1, d), "pos_embed": randn(1, positions, d)}
    state["patch_embed.proj.weight"] = randn(d, 3, p, p, std=(3 * p * p) ** -0.5)
    state["patch_embed.proj.bias"] = randn(d)
    for i in range(DIMS["vit_blocks_in_file"]):
        b = f"blocks.{i}"
        layer_norm(state, f"{b}.norm1", d)
        linear(state, f"{b}.attn.qkv", 3 * d, d, bias=False)
        state[f"{b}.attn.q_bias"] = randn(d)
        state[f"{b}.attn.v_bias"] = randn(d)
        linear(state, f"{b}.attn.proj", d, d)
        layer_norm(state, f"{b}.norm2", d)
        linear(state, f"{b}.mlp.fc1", mlp, d)
        linear(state, f"{b}.mlp.fc2", d, mlp)
    return state


def blip2_state():
    """The 'model' dict of blip2_pretrained_flant5xxl.pth: what LAVIS saved (trainable parameters)."""
    h, v, mlp = DIMS["qformer_width"], DIMS["vit_width"], DIMS["qformer_mlp"]
    state = {"query_tokens": randn(1, DIMS["num_query_tokens"], h, std=0.5)}
    layer_norm(state, "ln_vision", v)
    q = "Qformer.bert"
    state[f"{q}.embeddings.word_embeddings.weight"] = randn(100, h)  # text side, unused by MiniGPT-4
    state[f"{q}.embeddings.position_embeddings.weight"] = randn(512, h)
    state[f"{q}.embeddings.position_ids"] = torch.arange(512)[None]
    layer_norm(state, f"{q}.embeddings.LayerNorm", h)
    for i in range(DIMS["qformer_layers"]):
        layer = f"{q}.encoder.layer.{i}"
        attentions = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
        for attention in attentions:
            n_in = v if attention == "crossattention" else h
            linear(state, f"{layer}.{attention}.self.query", h, h)
            linear(state, f"{layer}.{attention}.self.key", h, n_in)
            linear(state, f"{layer}.{attention}.self.value", h, n_in)
            linear(state, f"{layer}.{attention}.output.dense", h, h)
            layer_norm(state, f"{layer}.{attention}.output.LayerNorm", h)
        for suffix in ("", "_query"):  # "" is the text feed-forward, unused by MiniGPT-4
            linear(state, f"{layer}.intermediate{suffix}.dense", mlp, h)
            linear(state, f"{layer}.output{suffix}.dense", h, mlp)
            layer_norm(state, f"{layer}.output{suffix}.LayerNorm", h)
    linear(state, "Qformer.cls.predictions.transform.dense", h, h)
    linear(state, "t5_proj", 32, h)
    return state


def minigpt4_checkpoint(in_features):
    state = {}
    linear(state, "llama_proj", DIMS["llm_width"], in_features)
    return {"model": state, "epoch": 3, "config": {"model": {"arch": "minigpt4"}}}


def save_llama(folder, tokenizer_files):
    """An HF-format Llama folder; the tokenizer is sentencepiece's tokenizer.model (plus config files if asked)."""
    os.makedirs(folder, exist_ok=True)
    vocab_size = train_tokenizer(os.path.join(folder, "tokenizer.model"))
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=DIMS["llm_width"], intermediate_size=DIMS["llm_mlp"],
        num_hidden_layers=DIMS["llm_layers"], num_attention_heads=DIMS["llm_heads"],
        num_key_value_heads=DIMS["llm_heads"], max_position_embeddings=512, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(randn(*param.shape, mean=1.0) if "norm" in name else randn(*param.shape, std=0.3))
    model.save_pretrained(folder)
    if tokenizer_files:  # special tokens as AddedToken dicts, as Llama-2-7b-chat-hf has them; legacy as in 4.30
        special = {name: {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False}
                   for name, content in [("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")]}
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                       "clean_up_tokenization_spaces": False, "legacy": True, "pad_token": None,
                       **{name: {"__type": "AddedToken", **token} for name, token in special.items()}}, f, indent=2)
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
            json.dump(special, f, indent=2)


def save_blip2_hf(folder, eva, blip2):
    """The ViT and Q-Former as a transformers BLIP-2 folder, named as transformers' conversion names them."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    os.makedirs(folder, exist_ok=True)
    d, layers = DIMS["vit_width"], DIMS["vit_blocks_in_file"] - 1
    vision = Blip2VisionConfig(
        hidden_size=d, intermediate_size=DIMS["vit_mlp"], num_hidden_layers=layers, num_attention_heads=d // 88,
        image_size=DIMS["image_size"], patch_size=DIMS["patch_size"],
    )
    qformer = Blip2QFormerConfig(
        hidden_size=DIMS["qformer_width"], num_hidden_layers=DIMS["qformer_layers"],
        num_attention_heads=DIMS["qformer_width"] // 64, intermediate_size=DIMS["qformer_mlp"], encoder_hidden_size=d,
    )
    text = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                     word_embed_proj_dim=32)
    Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                num_query_tokens=DIMS["num_query_tokens"]).save_pretrained(folder)
    state = {
        "vision_model.embeddings.class_embedding": eva["cls_token"],
        "vision_model.embeddings.position_embedding": eva["pos_embed"],
        "vision_model.embeddings.patch_embedding.weight": eva["patch_embed.proj.weight"],
        "vision_model.embeddings.patch_embedding.bias": eva["patch_embed.proj.bias"],
        "vision_model.post_layernorm.weight": blip2["ln_vision.weight"],
        "vision_model.post_layernorm.bias": blip2["ln_vision.bias"],
        "query_tokens": blip2["query_tokens"],
        "language_projection.weight": randn(32, DIMS["qformer_width"]),
        "language_projection.bias": randn(32),
    }
    for i in range(layers):
        src, dst = f"blocks.{i}", f"vision_model.encoder.layers.{i}"
        for a, b in [("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
            state[f"{dst}.{b}.weight"] = eva[f"{src}.{a}.weight"]
            state[f"{dst}.{b}.bias"] = eva[f"{src}.{a}.bias"]
        state[f"{dst}.self_attn.qkv.weight"] = eva[f"{src}.attn.qkv.weight"]
        q_bias, v_bias = eva[f"{src}.attn.q_bias"], eva[f"{src}.attn.v_bias"]
        state[f"{dst}.self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    for key, value in blip2.items():
        if key.startswith("Qformer.bert.encoder."):
            key = key.replace("Qformer.bert.", "qformer.").replace("attention.self.", "attention.attention.")
            if not re.search(r"\.layer\.\d+\.(intermediate|output)\.", key):  # transformers lacks the text feed-forward
                state[key] = value
    state["qformer.layernorm.weight"] = blip2["Qformer.bert.embeddings.LayerNorm.weight"]
    state["qformer.layernorm.bias"] = blip2["Qformer.bert.embeddings.LayerNorm.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))


def write_configs(root):
    """The original eval configs and model configs, in the original repository layout."""
    models = os.path.join(root, "repo", "minigpt4", "configs", "models")
    evals = os.path.join(root, "repo", "eval_configs")
    os.makedirs(models, exist_ok=True)
    os.makedirs(evals, exist_ok=True)
    processor = {"name": "blip2_image_eval", "image_size": DIMS["image_size"]}
    common = {"arch": "minigpt4", "image_size": DIMS["image_size"], "drop_path_rate": 0,
              "use_grad_checkpoint": False, "vit_precision": "fp16", "freeze_vit": True, "prompt": ""}
    variants = {
        "vicuna0": ("minigpt4_eval.yaml", "###", "###Human: {} ###Assistant: ", "pretrained_minigpt4.pth",
                    {"freeze_qformer": True, "num_query_token": 32}),
        "llama2": ("minigpt4_llama2_eval.yaml", "</s>", "[INST] {} [/INST] ", "pretrained_minigpt4_llama2_7b.pth",
                   {"has_qformer": False}),
    }
    for model_type, (eval_name, end_sym, template, ckpt, extra) in variants.items():
        llm = os.path.join(root, "llama2" if model_type == "llama2" else "vicuna")
        model = {**common, **extra, "llama_model": llm}
        with open(os.path.join(models, f"minigpt4_{model_type}.yaml"), "w") as f:
            yaml.safe_dump({"model": model, "preprocess": {"vis_processor": {"eval": processor}}}, f, sort_keys=False)
        evaluation = {
            "model": {"arch": "minigpt4", "model_type": f"pretrain_{model_type}", "max_txt_len": 160,
                      "end_sym": end_sym, "low_resource": True, "prompt_template": template,
                      "ckpt": os.path.join(root, ckpt)},
            "datasets": {"cc_sbu_align": {"vis_processor": {"train": processor},
                                          "text_processor": {"train": {"name": "blip_caption"}}}},
            "run": {"task": "image_text_pretrain"},
        }
        with open(os.path.join(evals, eval_name), "w") as f:
            yaml.safe_dump(evaluation, f, sort_keys=False)


def build(root, seed=0):
    """Write every tiny file under `root`; returns `root`."""
    torch.manual_seed(seed)
    os.makedirs(root, exist_ok=True)
    eva, blip2 = eva_vit_state(), blip2_state()
    torch.save(eva, os.path.join(root, "eva_vit_g.pth"))
    torch.save({"model": blip2}, os.path.join(root, "blip2_pretrained_flant5xxl.pth"))
    torch.save(minigpt4_checkpoint(DIMS["qformer_width"]), os.path.join(root, "pretrained_minigpt4.pth"))
    torch.save(minigpt4_checkpoint(4 * DIMS["vit_width"]), os.path.join(root, "pretrained_minigpt4_llama2_7b.pth"))
    save_llama(os.path.join(root, "vicuna"), tokenizer_files=False)
    save_llama(os.path.join(root, "llama2"), tokenizer_files=True)
    save_blip2_hf(os.path.join(root, "blip2-hf"), eva, blip2)
    write_configs(root)
    cache = os.path.join(root, "torch_home", "hub", "checkpoints")
    os.makedirs(cache, exist_ok=True)
    for name in ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"):
        shutil.copy(os.path.join(root, name), cache)
    with open(os.path.join(root, "dims.json"), "w") as f:
        json.dump(DIMS, f, indent=2)
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/minigpt4_checkpoint.py OUT_DIR")
    print(build(os.path.abspath(sys.argv[1])))
