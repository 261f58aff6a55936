"""`sdpa_grouped`: PyTorch SDPA attention without copying the KV cache per query head.

With a padding mask (every left-padded batch has one), transformers' sdpa path cannot use SDPA's own grouped-query
support and repeats each key/value head for every query head that shares it: the whole KV cache is copied 4x
(InternLM2) to 7x (Qwen2) in every layer. That copy is a large part of a decode step's GPU time, and of a prefill of
a few tokens on top of a long cache (utils/generation/shared_prefix.py: each prompt's own tokens after the image's
shared prefix); see bench/RESULTS.md. Instead, the query heads of a group stand in the query-length dimension:
(batch, kv_heads, group x length, dim) against (batch, kv_heads, keys, dim), each group's rows masked as its
positions are; the same arithmetic, no copy of the keys. Without a mask, or without grouped heads, transformers'
sdpa path runs unchanged (SDPA's own grouped-query support needs no copy there).

Cascade attention: in utils/generation/refill.py's decode steps the rows of an image share its prefix (~1,900
tokens of image and template), kept once per image (`shared_prefixes`, a refill.PrefixPool) instead of once per row.
A step's queries attend to their image's prefix, all rows of an image in one call, and to their own keys; the two
softmaxes are merged by their log-sum-exps. Each part is SDPA's own kernel (memory-efficient on the GPU, the CPU's
flash kernel), called for its log-sum-exp as well.

Packed sequences (a vision tower's images or windows, all of a batch's in one tensor): `padded_attention` attends
within each in one SDPA call over them padded to the longest (PaddedLayout), where transformers' SDPA path makes
one call per sequence: thousands of small calls per layer for Qwen2.5-VL's windows.
"""
from typing import NamedTuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from utils.generation.tensors import to_device_async


def sdpa_grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if kwargs.get("shared_prefixes") is not None:
        return cascade_attention(module, query, key, value, attention_mask, scaling, kwargs["shared_prefixes"])
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


def attention_with_lse(query, key, value, bias, scale):
    """SDPA's output and the log-sum-exp of each query row's scores; bias: additive, in the query's dtype, its last
    dimension a multiple of 16 (the GPU kernel's alignment)."""
    bias = bias.expand(*query.shape[:-1], key.shape[-2])
    if query.device.type == "cuda":
        output, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True,
                                                                             scale=scale)[:2]
        return output, lse[..., :query.shape[-2]]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=bias, scale=scale)


def additive(mask, dtype):
    """A boolean mask (True: attend) as SDPA's additive bias."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def cascade_attention(module, query, key, value, attention_mask, scaling, prefixes):
    """One decode step (a query per row) over each row's image prefix in `prefixes` and over the row's own keys
    (`key`, `value`, `attention_mask`: the slots' cache), merged; see the module docstring."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(rows, kv_heads, groups, dim)  # a group's heads in the length dimension, as above
    own, own_lse = attention_with_lse(grouped, key, value, additive(attention_mask, query.dtype), scaling)
    entries, per_entry = prefixes.entry_rows.shape
    entry_queries = grouped[prefixes.entry_rows].transpose(1, 2).reshape(entries, kv_heads, per_entry * groups, dim)
    prefix_keys, prefix_values = prefixes.layer(module.layer_idx)
    shared, shared_lse = attention_with_lse(entry_queries, prefix_keys, prefix_values, prefixes.bias, scaling)
    # back to the rows: entry e's row r is e * per_entry + r
    shared = shared.reshape(entries, kv_heads, per_entry, groups, dim).transpose(1, 2).reshape(
        entries * per_entry, kv_heads, groups, dim)[prefixes.row_position]
    shared_lse = shared_lse.reshape(entries, kv_heads, per_entry, groups).transpose(1, 2).reshape(
        entries * per_entry, kv_heads, groups)[prefixes.row_position]
    total = torch.logaddexp(shared_lse.float(), own_lse.float())
    output = (shared.float() * torch.exp(shared_lse.float() - total)[..., None]
              + own.float() * torch.exp(own_lse.float() - total)[..., None])
    return output.to(query.dtype).reshape(rows, 1, heads, dim), None


class PaddedLayout(NamedTuple):
    """Packed sequences (their boundaries, as cu_seqlens) laid out as a padded batch for one attention call: where
    each token goes in the (sequences x longest) block, and which keys of a row are real."""
    boundaries: torch.Tensor  # (sequences + 1,), on the CPU: the tensor the layout was made from
    index: torch.Tensor  # (tokens,): each token's place in the padded block
    key_mask: torch.Tensor  # (sequences, 1, 1, longest), True where a key is one of the row's tokens
    longest: int

    @classmethod
    def of(cls, boundaries):
        lengths = boundaries[1:] - boundaries[:-1]
        longest = int(lengths.max())
        sequence = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        offset = torch.arange(int(boundaries[-1])) - boundaries[:-1][sequence]
        key_mask = torch.arange(longest)[None] < lengths[:, None]
        return cls(boundaries, sequence * longest + offset, key_mask[:, None, None], longest)

    def to(self, device):
        return self._replace(index=to_device_async(self.index, device), key_mask=to_device_async(self.key_mask, device))


def padded_attention(query, key, value, layout, scale):
    """Attention within each of the packed sequences of (tokens, heads, dim) query, key and value, in one SDPA call
    over them padded to the longest, each row's padding masked out; returns (tokens, heads, dim)."""
    sequences, longest = layout.key_mask.shape[0], layout.longest
    heads, dim = query.shape[1:]

    def padded(tensor):
        block = tensor.new_zeros(sequences * longest, heads, dim)
        block[layout.index] = tensor
        return block.view(sequences, longest, heads, dim).transpose(1, 2)

    output = torch.nn.functional.scaled_dot_product_attention(padded(query), padded(key), padded(value),
                                                              attn_mask=layout.key_mask, scale=scale)
    return output.transpose(1, 2).reshape(sequences * longest, heads, dim)[layout.index]


AttentionInterface.register("sdpa_grouped", sdpa_grouped_attention)
AttentionMaskInterface.register("sdpa_grouped", sdpa_mask)
