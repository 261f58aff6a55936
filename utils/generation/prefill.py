"""Prefilling rows whose prompts begin alike: each image's shared prefix once, then each row's own tokens.

The rows of an image (one per prompt) begin with the same tokens up to their question: the longest common prefix
of their token ids (nothing is assumed about the template) but never a whole row, so that every row keeps a token
to prefill. A token of that prefix has the same ids and image features before it in every row, hence the same keys
and values. Rows are [padding][prefix][padding][own tokens]: prefixes left-padded to the longest prefix, own
tokens to the longest own part, the attention mask 0 on both paddings; position ids follow the mask as generate()
makes them, so every real token sees exactly what it sees in its unpadded sequence.
"""
from typing import NamedTuple

import torch
from transformers import DynamicCache

from utils.generation.tensors import left_padded, mask_positions, to_device_async


class PrefilledRows(NamedTuple):
    cache: object  # DynamicCache of the rows, image-major: each its image's prefix (copied), then its own tokens
    mask: object  # their attention mask
    logits: object  # of each row's first new token
    prefixes: list  # per layer (keys, values) of the prefixes alone, one row per image
    prefix_width: int  # the prefixes' columns, the first of every row


def prefill_rows(model, prompt_ids, image_features, image_token_id, pad_token_id):
    """Every row's prompt prefilled, its image's shared prefix once (PrefilledRows). As generate() prefills,
    positions follow the mask."""
    cache, mask, own_embeds, image_of_row = prefill_prefixes(model, prompt_ids, image_features, image_token_id,
                                                             pad_token_id)
    prefixes = [(layer.keys, layer.values) for layer in cache.layers]
    cache.batch_select_indices(image_of_row)
    position_ids = mask_positions(mask)[:, -own_embeds.shape[1]:]
    output = model(inputs_embeds=own_embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
    return PrefilledRows(cache, mask, output.logits[:, -1], prefixes, mask.shape[1] - own_embeds.shape[1])


def prefill_prefixes(model, prompt_ids, image_features, image_token_id, pad_token_id):
    """Each image's shared prefix prefilled once, and what is left of every row: (prefix cache, one row per image;
    each row's attention mask, its image's prefix then its own tokens; the rows' own embeddings, left-padded; the
    image of each row, a tensor)."""
    prefix_lengths = [shared_prefix_length(rows) for rows in prompt_ids]
    prefix_ids = [rows[0][:length] for rows, length in zip(prompt_ids, prefix_lengths)]
    prefix_image_tokens = [ids.count(image_token_id) for ids in prefix_ids]
    prefix_embeds, prefix_mask = embed(
        model, prefix_ids, [features[:n] for features, n in zip(image_features, prefix_image_tokens)],
        image_token_id, pad_token_id)
    prefix_cache = prefill(model, prefix_embeds, prefix_mask)
    del prefix_embeds

    image_of_row = [i for i, rows in enumerate(prompt_ids) for _ in rows]
    own_ids = [ids[length:] for rows, length in zip(prompt_ids, prefix_lengths) for ids in rows]
    own_embeds, own_mask = embed(model, own_ids, [image_features[i][prefix_image_tokens[i]:] for i in image_of_row],
                                 image_token_id, pad_token_id)
    image_of_row = to_device_async(torch.tensor(image_of_row), model.device)
    return prefix_cache, torch.cat([prefix_mask[image_of_row], own_mask], dim=1), own_embeds, image_of_row


def shared_prefix_length(id_lists):
    """Length of the longest common prefix of the id lists, leaving at least one token of each."""
    length = 0
    for column in zip(*id_lists):
        if any(token != column[0] for token in column):
            break
        length += 1
    return min(length, min(map(len, id_lists)) - 1)


def embed(model, id_lists, features, image_token_id, pad_token_id):
    """Left-padded input embeddings and attention mask of id lists; the image tokens of row r take features[r]. Nothing
    here waits for the GPU, so that the CPU can launch what follows while the GPU works."""
    ids, mask = left_padded(id_lists, pad_token_id)
    image_positions = (ids.view(-1) == image_token_id).nonzero().squeeze(1)  # found on the CPU
    embeds = model.get_input_embeddings()(to_device_async(ids, model.device))
    if len(image_positions):
        # the image tokens in row-major order take the rows' features in order: one copy, not one per row
        embeds.view(-1, embeds.shape[-1]).index_copy_(0, to_device_async(image_positions, model.device),
                                                      torch.cat(list(features)).to(embeds.dtype))
    return embeds, to_device_async(mask, model.device)


def prefill(model, embeds, mask):
    """The KV cache of left-padded sequences, position ids following the mask as generate() makes them."""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    model.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=mask_positions(mask),
                        past_key_values=cache, use_cache=True)
    return cache
