"""Original InternVL2 checkpoints (model_type "internvl_chat", remote code) -> transformers' native
InternVLForConditionalGeneration: the config, the weight names, the packed qkv projections.

internvl.py loads an original folder through load_original (converted in memory, at every load);
convert_checkpoint writes the native folder once (python internvl.py --convert-to DIR --model CKPT), which
later runs, and plain from_pretrained, load as it is.
"""
import glob
import os
import re
import shutil

from safetensors import safe_open

from convert import load_converted
from utils.checkpoints import read_json
from utils.errors import UserError

# torch and transformers are imported where they are used.


# llm_config keys that carry over to the native text config; the rest are remote-code or 4.x leftovers
# (auto_map, attn_implementation: flash_attention_2, ...). Rope settings are handled on their own.
TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                    "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias",
                    "use_sliding_window", "sliding_window", "max_window_layers",
                    "original_max_position_embeddings", "partial_rotary_factor")
TEXT_CONFIG_CLASSES = {"InternLM2ForCausalLM": "LlamaConfig", "LlamaForCausalLM": "LlamaConfig",
                       "Qwen2ForCausalLM": "Qwen2Config", "Phi3ForCausalLM": "Phi3Config",
                       "Qwen3ForCausalLM": "Qwen3Config"}  # transformers' names; Qwen3: InternVL3.5


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


def load_original(folder, config, dtype, device, attention="sdpa"):
    """InternVLForConditionalGeneration from an original folder whose config.json is `config`, converted in
    memory."""
    from transformers import InternVLForConditionalGeneration
    native = native_config(config)
    state_dict = convert_state_dict(folder, native, config["llm_config"]["architectures"][0])
    return load_converted(InternVLForConditionalGeneration, native, state_dict, folder, "its config", dtype=dtype,
                          device_map=device, attn_implementation=attention)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def convert_checkpoint(folder, out_dir, image_token_id):
    """Write an original InternVL2 checkpoint in the native format (weights in the checkpoint's dtype, the
    original tokenizer files, the chat template name kept in config.json). image_token_id: the id of
    <IMG_CONTEXT> in the checkpoint's tokenizer (internvl.load_tokenizer)."""
    config = read_json(os.path.join(folder, "config.json"), {})
    if config.get("model_type") != "internvl_chat":
        raise UserError(f"{folder} is not an original InternVL2 checkpoint (model_type internvl_chat)")
    if os.path.exists(os.path.join(out_dir, "config.json")):
        raise UserError(f"{out_dir} already holds a checkpoint")
    import torch
    model = load_original(folder, config, getattr(torch, config.get("torch_dtype") or "bfloat16"), "cpu")
    model.config.image_token_id = image_token_id  # the class default is another model's
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), out_dir)
    return out_dir
