"""Generation for several prompts per image that computes the part the prompts share once per image.

With the paper's five prompts, the five rows of an InternVL2-8B image begin with the same ~1,850 tokens (system
text, <img>, 256 image tokens per tile, 7 x 256 with 6 tiles and the thumbnail, </img>); only the question and
the assistant header (about 10 to 30 tokens) differ. A plain left-padded generate() prefills every row in full, so
those tokens run through the language model five times. Here, for every image:

1. its shared prefix runs through the language model once: the longest common prefix of its rows' token ids (so
   nothing is assumed about the template; a token in it has the same ids and image features before it in every
   row, hence the same keys and values), but never a whole row, so that every row keeps a token to prefill;
2. that KV cache is copied to each of the image's rows, into the cache that generate() decodes with: a
   StaticCache when decode steps are CUDA graphs (utils/cuda_graphs.py), a DynamicCache otherwise. Each row
   holds its own copy, as in the plain path (attention reads one cache row per sequence), so the decoding
   cache is as large as before; the prefix cache is freed layer by layer as it is copied;
3. generate() prefills only each row's own tokens on top of it and decodes all rows together, with the caller's
   kwargs (greedy or sampling, end tokens, pad token, min/max new tokens), so stopping and the padding of
   finished rows are generate()'s own.

Alignment: padding inside the sequence. Each row is [padding][prefix][padding][own tokens]: the prefixes are
left-padded to the longest prefix, the own tokens to the longest own part, and the attention mask is 0 on both
paddings. generate() derives the position ids from the mask (its cumulative sum), so every real token keeps its
position and sees exactly the tokens it sees in its unpadded sequence: the arithmetic of the plain left-padded
batch, with some masked columns in the middle instead of at the start (the width is the same when the questions
tokenize alike for every image). The alternative, shifting each row's copy of the prefix so that its question
follows without a gap, gives the same numbers but needs a per-row scatter instead of one index_select; the
prefill of a prefix sits at one column for all rows of its image anyway.

One prompt per image, or beam search (generate() expands rows by beams itself), takes the plain path: there is
nothing to share (the split would add a second forward and, with a static cache, a copy of the cache), and the
plain path is the reference the tests compare the shared one with.

With --decode-rows, utils/refill.py decodes the rows in a fixed number of slots that take the next image's rows as
captions end; it prefills them here (prefill_rows: the shared prefix once per image, then each row's own tokens).
"""
import warnings

import torch
from transformers import DynamicCache, StaticCache

from utils.captioning import left_padded, mask_positions, to_device_async
from utils.cuda_graphs import uses_static_cache


def generate(model, prompt_ids, image_features, image_token_id, pad_token_id, decode_rows=None, **generate_kwargs):
    """New tokens for every (image, prompt) row, image-major, as a (rows, new tokens) tensor padded with
    pad_token_id after a row's end. prompt_ids[i][j]: token ids of image i with prompt j, whose image tokens
    (image_token_id) take the rows of image_features[i] (image tokens x hidden size) in order. The shared prefix is
    used when an image has several prompts, with greedy or sampled decoding. decode_rows: decode in that many rows,
    refilled as captions end (utils/refill.py), where the generation settings allow it."""
    from utils import refill  # which builds on this module
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


def prefill_rows(model, prompt_ids, image_features, image_token_id, pad_token_id):
    """Every row's prompt prefilled, its image's shared prefix once: (a DynamicCache of the rows, image-major, their
    attention mask, the logits of each row's first new token). As generate() prefills, positions follow the mask."""
    cache, mask, own_embeds, image_of_row = prefill_prefixes(model, prompt_ids, image_features, image_token_id,
                                                             pad_token_id)
    cache.batch_select_indices(image_of_row)
    position_ids = mask_positions(mask)[:, -own_embeds.shape[1]:]
    output = model(inputs_embeds=own_embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
    return cache, mask, output.logits[:, -1]


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
