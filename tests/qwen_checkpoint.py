"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints in the standard hub format, for tests.

Same files as Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen3-VL-8B-Instruct (config.json
with the real field set, generation_config.json, model.safetensors under the real key names, tokenizer files with
the chat template, preprocessor_config.json), only small: its own byte-level BPE tokenizer trained on a few
sentences, so every special-token id differs from the real model's. Qwen2.5-VL's vision tower keeps window
attention with full-attention blocks between, Qwen3-VL's its patch size of 16, learned position embeddings and
deepstack features.

    python tests/qwen_checkpoint.py OUT_DIR [qwen2_vl | qwen2_5_vl | qwen3_vl]
"""
import json
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLProcessor, Qwen3VLVideoProcessor)

SENTENCES = [
    "A photo of a dog running on the grass in a park.",
    "The image shows a red car parked next to a tall building.",
    "Describe the image in detail: a cat sleeps on a wooden table.",
    "Two people are walking along the beach at sunset, with waves behind them.",
    "A bowl of fruit with apples, bananas and oranges on a kitchen counter.",
    "The background is a blue sky with white clouds over green mountains.",
]
# Qwen2-VL's chat tokens, appended after the trained vocabulary (the real ids are 151643 and up).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# The chat template of Qwen2-VL-Instruct checkpoints, reduced to what images and text need.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS = 56 * 56  # 4 merged image tokens
MAX_PIXELS = 28 * 28 * 16  # at most 16 merged image tokens: quick on a CPU
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096)
# model type: (config, model, processor, video processor, patch size, vision config, text config beyond TEXT)
FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor, 14,
                 dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
                 dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})),
    # windows of 2 x 2 merged tokens (the real 112 px of 14 px patches: 4 x 4); blocks 1 and 3 attend to the whole image
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor,
                   14, dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            window_size=56, fullatt_block_indexes=[1, 3]),
                   dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})),
    # an 8 x 8 table of position embeddings, interpolated to each grid; deepstack features from blocks 0 and 1
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor, 16,
                 dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
                 dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                    "mrope_section": [2, 3, 3], "mrope_interleaved": True})),
}


def make_tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(SENTENCES, trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab, merges = trained["vocab"], [tuple(pair) for pair in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_checkpoint(path, seed=0, model_type="qwen2_vl"):
    config_class, model_class, processor_class, video_processor, patch, vision, text = FAMILIES[model_type]
    tokenizer = make_tokenizer()
    scale = (patch / 14) ** 2  # the same merged-token budget whatever the patch size
    image_processor = Qwen2VLImageProcessor(min_pixels=int(MIN_PIXELS * scale), max_pixels=int(MAX_PIXELS * scale),
                                            patch_size=patch)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_processor(), chat_template=CHAT_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = config_class(
        vision_config=dict(patch_size=patch, **vision),
        text_config=dict(vocab_size=len(tokenizer), **TEXT, **text, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # larger than default init so that greedy captions vary between images
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        do_sample=False)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(make_checkpoint(sys.argv[1], model_type=sys.argv[2] if len(sys.argv) > 2 else "qwen2_vl"))
