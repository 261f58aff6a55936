"""`sdpa_grouped`: PyTorch SDPA attention without copying the KV cache per query head.

With a padding mask (every left-padded batch has one), transformers' sdpa path cannot use SDPA's own grouped-query
support and repeats each key/value head for every query head that shares it: the whole KV cache is copied 4x
(InternLM2) to 7x (Qwen2) in every layer. That copy is a large part of a decode step's GPU time, and of a prefill of
a few tokens on top of a long cache (utils/generation/shared_prefix.py: each prompt's own tokens after the image's
shared prefix); see bench/RESULTS.md. Instead, the query heads of a group stand in the query-length dimension:
(batch, kv_heads, group x length, dim) against (batch, kv_heads, keys, dim), each group's rows masked as its
positions are; the same arithmetic, no copy of the keys. Without a mask, or without grouped heads, transformers'
sdpa path runs unchanged (SDPA's own grouped-query support needs no copy there).
"""
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def sdpa_grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    plain = groups == 1 or dropout or kwargs.get("output_attentions")
    if plain or (attention_mask is None and length > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Query head h reads key/value head h // groups, as transformers' repeat_kv lays them out; row g * length + t
    # of a grouped query is head g of the group at position t.
    grouped = query.reshape(batch, heads // groups, groups * length, dim)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        if length > 1:  # (one position: the mask's row serves every head of the group as it is)
            attention_mask = attention_mask.repeat(1, 1, groups, 1)
    output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                              scale=scaling)
    return output.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register("sdpa_grouped", sdpa_grouped_attention)
AttentionMaskInterface.register("sdpa_grouped", sdpa_mask)
