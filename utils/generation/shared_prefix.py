"""generate() for the (image, prompt) rows of a batch: the plain left-padded path, the shared-prefix path and the
refilled rows.

With several prompts per image (the five-prompt recipe), an image's rows begin with the same ~1,850 tokens (system
text, the image tokens, the text before the question). The shared path prefills them once per image
(utils/generation/prefill.py), copies that KV cache to each of the image's rows, into the cache generate() decodes
with (a StaticCache when decode steps are CUDA graphs, a DynamicCache otherwise), and lets generate() prefill only
each row's own tokens and decode all rows together with the caller's kwargs, so that stopping and padding are
generate()'s own.

One prompt per image, or beam search, takes the plain path: there is nothing to share, and the plain path is the
reference the tests compare the others with. With decode_rows, utils/generation/refill.py decodes the rows in a
fixed number of slots that take the next image's rows as captions end.
"""
import warnings

import torch
from transformers import StaticCache

from utils.generation import refill
from utils.generation.cuda_graphs import uses_static_cache
from utils.generation.prefill import embed, prefill_prefixes


def generate(model, prompt_ids, image_features, image_token_id, pad_token_id, decode_rows=None, **generate_kwargs):
    """New tokens for every (image, prompt) row, image-major, as a (rows, new tokens) tensor padded with
    pad_token_id after a row's end. prompt_ids[i][j]: token ids of image i with prompt j, whose image tokens
    (image_token_id) take the rows of image_features[i] (image tokens x hidden size) in order. The shared prefix is
    used when an image has several prompts, with greedy or sampled decoding. decode_rows: decode in that many rows,
    refilled as captions end (utils/generation/refill.py), where the generation settings allow it."""
    if decode_rows and generate_kwargs.get("num_beams", 1) == 1:
        sampling = refill.logits_processors(model, generate_kwargs)
        if sampling is None:
            warnings.warn("--decode-rows: the generation settings read the tokens so far (e.g. a repetition "
                          "penalty in the checkpoint's generation_config.json); decoding without refilling rows")
        else:
            return refill.generate(model, prompt_ids, image_features, image_token_id, pad_token_id, decode_rows,
                                   sampling, eos_token_id=generate_kwargs["eos_token_id"],
                                   max_new_tokens=generate_kwargs["max_new_tokens"],
                                   min_new_tokens=generate_kwargs.get("min_new_tokens"))
    several_prompts = any(len(rows) > 1 for rows in prompt_ids)
    if several_prompts and generate_kwargs.get("num_beams", 1) == 1:
        return generate_with_shared_prefix(model, prompt_ids, image_features, image_token_id, pad_token_id,
                                           **generate_kwargs)
    return generate_left_padded(model, prompt_ids, image_features, image_token_id, pad_token_id, **generate_kwargs)


def generate_left_padded(model, prompt_ids, image_features, image_token_id, pad_token_id, **generate_kwargs):
    """The plain path: every row prefilled in full, left-padded to the longest."""
    pairs = [(ids, features) for rows, features in zip(prompt_ids, image_features) for ids in rows]
    embeds, mask = embed(model, [ids for ids, _ in pairs], [features for _, features in pairs], image_token_id,
                         pad_token_id)
    return model.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=pad_token_id, **generate_kwargs)


def generate_with_shared_prefix(model, prompt_ids, image_features, image_token_id, pad_token_id, **generate_kwargs):
    """As generate_left_padded, with each image's shared prefix prefilled once (see the module docstring)."""
    prefix_cache, attention_mask, own_embeds, image_of_row = prefill_prefixes(
        model, prompt_ids, image_features, image_token_id, pad_token_id)
    # room for the prompt and every new token but the last, which is never fed back
    cache = cache_for_rows(model, prefix_cache, image_of_row,
                           attention_mask.shape[1] + generate_kwargs["max_new_tokens"] - 1)
    # generate() takes the embeddings of the whole sequence but reads only those past the cache
    inputs_embeds = torch.nn.functional.pad(own_embeds, (0, 0, attention_mask.shape[1] - own_embeds.shape[1], 0))
    return model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_key_values=cache,
                          pad_token_id=pad_token_id, **generate_kwargs)


def cache_for_rows(model, prefix_cache, image_of_row, max_cache_len):
    """For each row the prefix cache of its image, in the cache generate() decodes with."""
    if not uses_static_cache(model):
        prefix_cache.batch_select_indices(image_of_row)
        return prefix_cache
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len)
    for index, layer in enumerate(prefix_cache.layers):
        cache.update(layer.keys[image_of_row], layer.values[image_of_row], index)
        layer.keys = layer.values = None  # each layer's prefix is freed once copied
    return cache
