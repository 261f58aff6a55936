"""Attention implementations registered with transformers: `sdpa_grouped` for decoding, packed varlen attention.

`sdpa_grouped`: PyTorch SDPA attention without copying the KV cache per query head while decoding.
With a padding mask (every left-padded batch has one), transformers' sdpa path cannot use SDPA's own
grouped-query support and repeats each key/value head for every query head that shares it: at each
decode step the whole KV cache is copied 4x (InternLM2) to 7x (Qwen2). On an H100 with Qwen2-VL-7B
at batch 128 that copy took 25 of the 43 ms of GPU time per step (bench/RESULTS.md). A decode step has
one query token, so the query heads of a group can stand in the query-length dimension instead:
(batch, kv_heads, group, dim) against (batch, kv_heads, length, dim), the same arithmetic, no copy.
Prefill and models without grouped heads take transformers' sdpa path unchanged.

`VARLEN_ATTENTION`: bidirectional attention over many sequences packed into one (cu_seqlens), in one
call of `torch.nn.attention.varlen.varlen_attn` instead of one SDPA call per sequence: for vision towers
that see all images of a batch as one sequence (Qwen2-VL). transformers passes the packed boundaries
only to implementations whose name contains "flash", hence the name. Where varlen_attn cannot run,
`varlen_unsupported` says why, and callers keep transformers' per-sequence path.
"""
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9
    varlen_attn = None

VARLEN_ATTENTION = "torch_flash_varlen"


def sdpa_grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or dropout or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    # Query head h reads key/value head h // groups, as transformers' repeat_kv lays them out.
    grouped = query.view(batch, heads // groups, groups, dim)
    output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                              scale=scaling)
    return output.reshape(batch, 1, heads, dim), None


def varlen_unsupported(dtype, device):
    """Why varlen_attn cannot run for this dtype and device, or None when it can. Its kernels (Flash
    Attention, or cuDNN on newer torch) exist only on CUDA GPUs of compute capability 8.0 or newer, in
    float16 and bfloat16; its `scale` argument came after torch 2.9 (torch 2.11 has it)."""
    if varlen_attn is None or "scale" not in inspect.signature(varlen_attn).parameters:
        return f"needs a torch whose varlen_attn takes `scale`, such as 2.11 (this is {torch.__version__})"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return "needs a CUDA GPU of compute capability 8.0 or newer"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    return None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, cu_seq_lens_q=None,
                     cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """Bidirectional attention, inference only: (1, heads, tokens, dim) inputs holding the sequences
    that cu_seq_lens delimit, each attending only to itself; returns (1, tokens, heads, dim)."""
    packed = [tensor[0].transpose(0, 1) for tensor in (query, key, value)]  # (tokens, heads, dim) views
    output = varlen_attn(*packed, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling)
    return output.unsqueeze(0), None


AttentionInterface.register("sdpa_grouped", sdpa_grouped_attention)
AttentionMaskInterface.register("sdpa_grouped", sdpa_mask)
AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
