"""Reference attention: gather each sequence's blocks, then ``scaled_dot_product_attention``.

The CPU path and the oracle the GPU kernel is tested against. Plain PyTorch, one SDPA call
per sequence, shaped exactly as transformers' own sdpa attention shapes a single sequence
(``[1, H, q, D]`` against ``[1, kv_heads, context, D]``), so a batched forward computes each
sequence the way transformers computes it alone. On the GPU the gather costs several times
the attention itself (DESIGN.md), so there it only serves prefill chunks, where the
attention's own compute dominates.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from djinn.attention.base import AttentionBackend, AttentionMetadata, SeqSpan


def gather_context(cache: torch.Tensor, span: SeqSpan, block_size: int) -> torch.Tensor:
    """``[total, kv_heads, D]``: the sequence's tokens read from its blocks, in order."""
    need = -(-span.total // block_size)
    idx = torch.tensor(span.table[:need], dtype=torch.long, device=cache.device)
    return cache.index_select(0, idx).flatten(0, 1)[: span.total]


# cuDNN attention is left out on CUDA. torch 2.11 picked it first on the H200 (measured), and it
# builds a graph per (query length, key length): the first call of each new shape took ~33 ms and
# the first of each kernel 0.5-0.9 s in a fresh process, where the memory-efficient kernel took
# 0.1-0.3 ms at any shape after one 12 ms first call (benchmarks/results/sdpa-first-call-cuda-
# 20261126T0325.txt). A prefill chunk after a grown context is nearly always a new shape, so every
# returning agent's turn paid it.
# Entering the choice costs ~13 us, so it is entered once per layer's spans, not per SDPA call.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_choice(t: torch.Tensor):
    return sdpa_kernel(_CUDA_SDPA) if t.is_cuda else contextlib.nullcontext()


def attend_span(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """``q`` [n, H, D] at positions ``start..start+n-1`` against ``k``/``v`` [start+n, Hkv, D]; -> [n, H, D]."""
    n, heads = q.shape[0], q.shape[1]
    kv_heads = k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)
    kh = k.transpose(0, 1).unsqueeze(0)
    vh = v.transpose(0, 1).unsqueeze(0)
    gqa = kv_heads != heads
    if n == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    elif start == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # query i (position start+i) sees keys 0..start+i: causal aligned to the bottom right.
        # With a mask, repeat K/V heads as transformers' sdpa path does (same numerics).
        if gqa:
            kh = kh.repeat_interleave(heads // kv_heads, dim=1)
            vh = vh.repeat_interleave(heads // kv_heads, dim=1)
        rows = torch.arange(n, device=q.device)[:, None] + start
        mask = torch.arange(start + n, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def attend_spans(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, spans: list[SeqSpan],
                 rows: list[int], block_size: int, scale: float, out: torch.Tensor) -> None:
    """Reference attention for the sequences ``spans`` whose first query row is ``rows[i]``."""
    with _sdpa_choice(q):
        for span, row in zip(spans, rows):
            k = gather_context(k_cache, span, block_size)
            v = gather_context(v_cache, span, block_size)
            out[row:row + span.new] = attend_span(q[row:row + span.new], k, v, span.start, scale).to(out.dtype)


class ReferenceBackend(AttentionBackend):
    name = "reference"
    graph_safe = False   # one SDPA per sequence, chosen on the host

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.spans is None:
            raise RuntimeError("the reference backend needs host-side spans (it cannot run inside a CUDA graph)")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        rows, row = [], 0
        for s in meta.spans:
            rows.append(row)
            row += s.new
        attend_spans(q, k_cache, v_cache, meta.spans, rows, meta.block_size, scale, out)
        return out
