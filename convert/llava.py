"""Original LLaVA-1.5 checkpoints (liuhaotian/llava-v1.5-13b: LlavaLlamaForCausalLM, Llama weights plus
model.mm_projector.*, the CLIP vision tower named in mm_vision_tower) -> transformers' LlavaForConditionalGeneration,
converted in memory while llava.py loads them; nothing of the LLaVA repository is needed.
"""
import json
import os

from convert import load_converted
from utils.errors import UserError

# torch, safetensors and transformers are imported where they are used.


# Llama config keys an original checkpoint carries for its language model.
LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "rope_scaling", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
              "tie_word_embeddings", "initializer_range")
# What an original config must say to be LLaVA-1.5: key -> (the original code's default, supported values).
LLAVA_15_SETTINGS = {"mm_projector_type": ("linear", ("mlp2x_gelu",)),
                     "mm_patch_merge_type": ("flat", ("flat",)),
                     "mm_use_im_start_end": (False, (False,)),
                     "mm_use_im_patch_token": (True, (False,)),
                     "mm_vision_select_feature": ("patch", ("patch", "cls_patch")),
                     "image_aspect_ratio": ("square", ("pad", "square"))}


def read_weights(folder):
    """All tensors of a checkpoint folder, safetensors or PyTorch pickles, sharded or not."""
    import safetensors.torch
    import torch
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(folder, single)):
            files = [single]
        else:
            continue
        paths = [os.path.join(folder, name) for name in files]
        if single.endswith(".safetensors"):
            return {k: v for path in paths for k, v in safetensors.torch.load_file(path).items()}
        return {k: v for path in paths
                for k, v in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()}
    raise UserError(f"no model.safetensors or pytorch_model.bin (or their index) in {folder}")


def is_original_format(config):
    # model_type is "llava" in both formats (AutoConfig would silently build a default llava-hf
    # config from an original one), so tell them apart by the original's mm_* keys.
    return "mm_vision_tower" in config or "mm_projector_type" in config


def convert_original(folder, config, vision_tower):
    """LlavaConfig and native state dict for an original LLaVA-1.5 checkpoint plus its CLIP vision tower.

    The original has no `<image>` token: the native model gets one more embedding row (zeros; the image
    features replace it) at id = the original vocabulary size. Its output row is never generated."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    for key, (default, supported) in LLAVA_15_SETTINGS.items():
        if config.get(key, default) not in supported:
            raise UserError(f"{folder}: {key}={config.get(key, default)!r} is not LLaVA-1.5 "
                            f"(expected one of {supported})")
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower)
    if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise UserError(f"vision tower {vision_tower} has hidden size {vision_config.hidden_size}, "
                        f"the checkpoint expects mm_hidden_size {config['mm_hidden_size']}")
    missing = [key for key in ("vocab_size", "hidden_size", "mm_vision_select_layer") if key not in config]
    if missing:
        raise UserError(f"{folder}/config.json lacks {', '.join(missing)}")
    vocab_size = config["vocab_size"]
    text_config = LlamaConfig(**{**{k: config[k] for k in LLAMA_KEYS if k in config}, "vocab_size": vocab_size + 1})
    llava_config = LlavaConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), image_token_index=vocab_size,
        vision_feature_layer=config["mm_vision_select_layer"], projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if config.get("mm_vision_select_feature") == "cls_patch" else "default",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        pad_token_id=config.get("pad_token_id"))

    projector = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
                 "model.mm_projector.2.": "model.multi_modal_projector.linear_2."}
    state = {}
    for key, value in read_weights(folder).items():
        if key.startswith("model.vision_tower.") or key.endswith(".rotary_emb.inv_freq"):
            continue  # LLaVA loads the tower from mm_vision_tower, whatever the checkpoint holds
        prefix = next((p for p in projector if key.startswith(p)), None)
        if prefix:
            state[projector[prefix] + key[len(prefix):]] = value
        elif key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value
        else:
            state[key] = value  # lm_head.weight
    embeddings = state["model.language_model.embed_tokens.weight"]
    state["model.language_model.embed_tokens.weight"] = torch.cat(
        [embeddings, embeddings.new_zeros(1, embeddings.shape[1])])
    lm_head = state["lm_head.weight"]
    state["lm_head.weight"] = torch.cat([lm_head, lm_head.new_zeros(1, lm_head.shape[1])])
    for key, value in read_weights(vision_tower).items():
        if key.startswith("vision_model.") and not key.endswith("position_ids"):
            state["model.vision_tower." + key[len("vision_model."):]] = value
    return llava_config, state



def load_original(folder, config, vision_tower, dtype, device, attention):
    """LlavaForConditionalGeneration from an original LLaVA-1.5 folder whose config.json is `config`, and the
    folder of its CLIP vision tower."""
    from transformers import LlavaForConditionalGeneration
    llava_config, state = convert_original(folder, config, vision_tower)
    return load_converted(LlavaForConditionalGeneration, llava_config, state, folder, "LLaVA-1.5", dtype=dtype,
                          device_map=device, attn_implementation=attention)
