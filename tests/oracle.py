"""The masking oracle: decode with the *full* cache while masking, per layer and KV head, exactly
the prompt keys that compaction evicted. Compaction is correct iff both give the same logits."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlcache.hf.adapter import decoder_stack

NAME = "vlcache_test_oracle"


def _oracle_attention(kept, prompt_len):
    def fn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        b, h_q, q_len, _ = query.shape
        h_kv, kv_len = key.shape[1], key.shape[2]
        group = h_q // h_kv
        k = key.repeat_interleave(group, dim=1)
        v = value.repeat_interleave(group, dim=1)
        w = (query @ k.transpose(-1, -2)) * scaling
        rows = torch.arange(q_len)[:, None] + (kv_len - q_len)
        hidden = torch.arange(kv_len)[None, :] > rows  # causal
        w = w.masked_fill(hidden, float("-inf"))
        idx = kept[module.layer_idx]
        if idx is not None and kv_len > prompt_len:  # rows past the prompt: hide the evicted prompt keys
            evicted = torch.ones(b, h_kv, kv_len, dtype=torch.bool)
            evicted[..., prompt_len:] = False
            evicted.scatter_(2, idx, False)
            after_prompt = (rows >= prompt_len)[None, None]  # (1, 1, q, 1)
            hide = evicted.repeat_interleave(group, dim=1)[:, :, None, :] & after_prompt
            w = w.masked_fill(hide, float("-inf"))
        p = torch.softmax(w.float(), dim=-1).to(query.dtype)
        return (p @ v).transpose(1, 2).contiguous(), p

    return fn


def oracle_generate(model, inputs, kept, max_new_tokens, prompt_len=None):
    """Greedy generate with the full cache and the evicted keys masked; returns (sequences, logits).

    ``prompt_len``: length of the compressed prompt (default: all of ``inputs["input_ids"]``); rows
    after it see only the kept prompt keys.
    """
    m = inputs["input_ids"].shape[-1] if prompt_len is None else prompt_len
    AttentionInterface.register(NAME, _oracle_attention(kept, m))
    AttentionMaskInterface.register(NAME, sdpa_mask)
    cfg = decoder_stack(model).config
    original = cfg._attn_implementation
    cfg._attn_implementation = NAME
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        cfg._attn_implementation = original
    return out.sequences, out.logits
