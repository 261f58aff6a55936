"""MiniGPT-4's LAVIS files -> transformers' BLIP-2 parts (Blip2VisionModel, Blip2QFormerModel): the configs that
LAVIS' create_eva_vit_g and init_Qformer build, read off the weights, and the weight names as transformers'
BLIP-2 conversion script renames them. minigpt4.py loads the files through these at every load.
"""
import json
import os

import torch
from safetensors import safe_open
from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

from utils.errors import UserError

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


def lavis_to_transformers(state):
    """A state dict in LAVIS names (EVA ViT-g, Q-Former, MiniGPT-4's own parts) in transformers' names."""
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

