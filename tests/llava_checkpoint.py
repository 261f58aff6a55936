"""Tiny random-weight LLaVA-1.5 checkpoints in both on-disk formats, made from the same weights.

- `original/llava-v1.5-tiny`: the layout of liuhaotian/llava-v1.5-13b (config with
  `LlavaLlamaForCausalLM`, `mm_*` keys and model_type "llava"; Llama weights plus `model.mm_projector.*`
  in two pytorch_model-*.bin shards; a sentencepiece tokenizer.model without an `<image>` token).
- `original/clip-vit-tiny-patch14-336`: the vision tower named by `mm_vision_tower`, a whole CLIP
  checkpoint (text and vision model) with its CLIP image processor, like openai/clip-vit-large-patch14-336.
- `llava-1.5-tiny-hf`: what transformers' convert_llava_weights_to_hf.py makes of it (llava-hf layout):
  `<image>` and `<pad>` appended to the tokenizer, embedding and output rows padded to a multiple of 64,
  the new rows set to the mean of the existing ones (the converter samples them around that mean).

Weights are rounded to float16 and stored in float16, as the published checkpoints are, so float32
runs of both formats (and of the original LLaVA code, which loads in float16) see the same numbers.

CLI for manual checks: python tests/llava_checkpoint.py OUT_DIR [--mm-vision-tower NAME]
"""
import argparse
import io
import json
from pathlib import Path
from typing import NamedTuple

import sentencepiece
import torch
from transformers import (AddedToken, CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM,
                          LlamaTokenizer, LlavaConfig, LlavaForConditionalGeneration)

SENTENCES = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: Describe the image in English in detail: ASSISTANT: A red square on a blue field.",
    "Describe the image. A cat sits on a mat near the window while 2 dogs run in the park.",
    "A photo of a small boat on a lake, with green trees and mountains in the background.",
    "Straße, café, naïve: text with numbers 12345 and a few accents.",
]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE = 336
PATCH_SIZE = 14
EOS_SCALE = 2.0


class Checkpoints(NamedTuple):
    hf: Path
    original: Path
    vision_tower: Path


def train_tokenizer(folder: Path) -> None:
    """A Llama-style sentencepiece BPE model (byte fallback, dummy prefix, <unk>/<s>/</s> = 0/1/2)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 10), model_writer=model, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    # the tokenizer files of liuhaotian/llava-v1.5-13b: sentencepiece model, slow LlamaTokenizer config
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right"})
    write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def fp16_rounded(module: torch.nn.Module, std: float) -> None:
    """Random weights large enough to give varied, image-dependent greedy captions, exact in float16."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name or "layrnorm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(std * torch.randn_like(param))
            param.copy_(param.half().float())


def build_checkpoints(root, mm_vision_tower: str = "openai/clip-vit-large-patch14-336", seed: int = 0) -> Checkpoints:
    """Write the three folders under `root`. `mm_vision_tower` is the name the original config carries
    (the published one by default, so loading needs --vision-tower; pass the tower's path to make the
    original folder self-contained, as the original LLaVA code needs)."""
    root = Path(root)
    torch.manual_seed(seed)
    original = root / "original" / "llava-v1.5-tiny"
    vision_tower = root / "original" / "clip-vit-tiny-patch14-336"
    hf = root / "llava-1.5-tiny-hf"
    train_tokenizer(original)
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(original / "tokenizer.model")).get_piece_size()

    clip_config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        projection_dim=16)
    clip = CLIPModel(clip_config)
    fp16_rounded(clip, std=0.05)
    clip.half().save_pretrained(vision_tower)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    image_processor.save_pretrained(vision_tower)

    text_config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False)
    language_model = LlamaForCausalLM(text_config)
    fp16_rounded(language_model, std=0.3)
    with torch.no_grad():
        # byte-fallback pieces (<0x00>..<0xFF>) mostly decode to nothing readable: make them unlikely
        language_model.lm_head.weight[3:259] *= 0.25
        # and let some captions end before --max-new-tokens
        language_model.lm_head.weight[text_config.eos_token_id] *= EOS_SCALE
        language_model.lm_head.weight.copy_(language_model.lm_head.weight.half().float())
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    fp16_rounded(projector, std=0.3)

    # original format: Llama keys as saved by LlavaLlamaForCausalLM, projector as model.mm_projector.{0,2}
    state = {key: value.half() for key, value in language_model.state_dict().items()}
    state.update({f"model.mm_projector.{key}": value.half() for key, value in projector.state_dict().items()})
    # two shards with an index, as the published pytorch_model-0000N-of-00003.bin
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        torch.save({key: state[key] for key in shard_keys}, original / name)
    write_json(original / "pytorch_model.bin.index.json", {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
        "weight_map": {key: name for name, shard_keys in shards.items() for key in shard_keys}})
    write_json(original / "config.json", {
        "_name_or_path": "./checkpoints/vicuna-tiny", "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 2048, "max_length": 2048, "rms_norm_eps": 1e-5,
        "rope_scaling": None, "pretraining_tp": 1, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_cache": True, "vocab_size": vocab_size, "initializer_range": 0.02,
        "image_aspect_ratio": "pad", "image_grid_pinpoints": None, "freeze_mm_mlp_adapter": False,
        "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": mm_vision_tower, "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False, "use_mm_proj": True, "transformers_version": "4.31.0"})

    # llava-hf format, as the conversion script makes it
    tokenizer = LlamaTokenizer.from_pretrained(original)
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    padded_vocab_size = -(-(vocab_size + 2) // 64) * 64
    hf_text_config = LlamaConfig(**{**text_config.to_dict(), "vocab_size": padded_vocab_size})
    config = LlavaConfig(text_config=hf_text_config, vision_config=clip_config.vision_config.to_dict(),
                         image_token_index=image_token_id, pad_token_id=tokenizer.pad_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    model = LlavaForConditionalGeneration(config)

    def with_mean_rows(weight):
        return torch.cat([weight, weight.mean(0, keepdim=True).expand(padded_vocab_size - vocab_size, -1)])

    text_state = language_model.state_dict()
    native = {f"model.language_model.{key[len('model.'):]}": value
              for key, value in text_state.items() if key.startswith("model.")}
    native["model.language_model.embed_tokens.weight"] = with_mean_rows(text_state["model.embed_tokens.weight"])
    native["lm_head.weight"] = with_mean_rows(text_state["lm_head.weight"])
    native.update({f"model.vision_tower.{key}": value
                   for key, value in clip.vision_model.state_dict().items()})
    native["model.multi_modal_projector.linear_1.weight"] = projector[0].weight
    native["model.multi_modal_projector.linear_1.bias"] = projector[0].bias
    native["model.multi_modal_projector.linear_2.weight"] = projector[2].weight
    native["model.multi_modal_projector.linear_2.bias"] = projector[2].bias
    model.load_state_dict(native, strict=True)
    model.half().save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    image_processor.save_pretrained(hf)
    return Checkpoints(hf=hf, original=original, vision_tower=vision_tower)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the checkpoints into")
    parser.add_argument("--mm-vision-tower", default=None,
                        help="name written as mm_vision_tower in the original config "
                             "(default: the absolute path of the tiny vision tower written next to it)")
    args = parser.parse_args()
    tower = args.mm_vision_tower or str((Path(args.out_dir) / "original" / "clip-vit-tiny-patch14-336").resolve())
    for name, path in build_checkpoints(args.out_dir, mm_vision_tower=tower)._asdict().items():
        print(f"{name}: {path}")
