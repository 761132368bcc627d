"""GPU paged attention: Triton kernels that read K/V in place from the pool.

Written for Djinn's layout: a block holds all layers, so one layer's keys are the strided view
``pool[:, layer, 0]`` = ``[num_blocks, block_size, kv_heads, D]`` (block stride = all layers' K
and V of a block). The kernels never copy the context: each program walks its sequence's
block table and loads key/value tiles straight from the blocks they live in.

Decode (flash-decoding): program ``(t, g, s)`` handles entry ``t`` (one query row), KV head
``g`` (with all ``H / kv_heads`` query heads that share it, as one tile: GQA costs one read of
K/V), and split ``s`` of the row's context. Splits let a small batch fill the GPU; their partial
results (normalised output + log-sum-exp) are merged by a second small kernel. Each row carries
its own ``kv_len`` (causality is per row), so the kernel serves decode rows and the rows of
small prefill chunks alike.

Prefill: program ``(tile, h)`` runs flash attention for up to ``block_m`` consecutive rows of one
chunk and query head ``h``, over the key tiles its rows see (unmasked ones first, then the
diagonal ones).

Launch configs (splits, tiles, warps, stages) come from ``DECODE_TABLE`` and ``PREFILL_CONFIG``,
measured by ``benchmarks/scripts/attn_sweep.py``. They depend on shapes only, never on device
data, so a launch is identical at every replay of a captured CUDA graph; each program derives
its range from its row's ``kv_len`` (or its tile's row count), read on the device.

``triton`` is imported on first use only: CPU installs and tests never need it. With
``TRITON_INTERPRET=1`` set before first use, the same kernels run on CPU tensors (slowly).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from djinn.attention.base import AttentionBackend, AttentionMetadata
from djinn.attention.reference import attend_spans


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _kernels(interpret: bool):
    """Compile-on-demand kernels; ``interpret`` only keys the cache (triton reads the env var)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _scores(q, k, DOT: tl.constexpr, IEEE: tl.constexpr):
        # q [M, D] . k [N, D]^T -> [M, N] float32. Without DOT a broadcast product on the CUDA
        # cores: for decode, where M is the GQA group (1 for MHA), tl.dot would pad M to 16
        if DOT:
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
        return s

    @triton.jit
    def _weighted(p, v, DOT: tl.constexpr, IEEE: tl.constexpr):
        # p [M, N] float32 . v [N, D] -> [M, D] float32
        if DOT:
            if IEEE:
                o = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                o = tl.dot(p.to(v.dtype), v)
        else:
            o = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        return o

    # the split count (and the LSE strides that follow it) are not specialized: one compile serves
    # every split count, where triton would compile variants for 1 and for multiples of 16
    @triton.jit(do_not_specialize=["num_splits", "stride_lt", "stride_lh"])
    def split_kernel(Q, K, V, Tables, TokSeq, KvLens, Rows, Out, PartO, PartLse,
                     qk_scale, num_splits,
                     stride_qt, stride_qh,
                     stride_kb, stride_ko, stride_kh,
                     stride_vb, stride_vo, stride_vh,
                     stride_tab,
                     stride_ot, stride_oh,
                     stride_pt, stride_ph, stride_ps,
                     stride_lt, stride_lh,
                     GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_ROWS: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
        t = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq = tl.load(TokSeq + t).to(tl.int64)
        kv_len = tl.load(KvLens + t)
        # entry t reads and writes row ``Rows[t]`` of Q/Out (a subset of a packed batch)
        if HAS_ROWS:
            row = tl.load(Rows + t).to(tl.int64)
        else:
            row = t.to(tl.int64)
        # this split's range, whole tiles only; later splits of a short context are empty
        chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, kv_len)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        offs_j = tl.arange(0, BLOCK_N)
        heads = kvh * GROUP + offs_h
        # kv_len 0 marks a padding entry (a captured graph's unused slot): it loads and stores nothing
        mask_h = offs_h < tl.where(kv_len > 0, GROUP, 0)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        table = Tables + seq * stride_tab
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + offs_j
            mask_n = offs_n < hi
            # masked lanes read table entry 0 of nothing: no load happens for them
            blk = tl.load(table + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
            slot = (offs_n % PAGE).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            # both loads issued before any math: twice the bytes in flight per program
            k = tl.load(k_base + (blk * stride_kb + slot * stride_ko)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(v_base + (blk * stride_vb + slot * stride_vo)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = _scores(q, k, DOT, IEEE)
            s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _weighted(p, v, DOT, IEEE)
            m_i = m_new

        out_mask = mask_h[:, None] & mask_d[None, :]
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        if num_splits > 1:
            lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
            tl.store(PartO + t * stride_pt + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                     out, mask=out_mask)
            tl.store(PartLse + t * stride_lt + heads * stride_lh + split, lse, mask=mask_h)
        else:
            tl.store(Out + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=out_mask)

    @triton.jit(do_not_specialize=["num_splits", "stride_lt", "stride_lh"])
    def merge_kernel(PartO, PartLse, KvLens, Rows, Out, num_splits,
                     stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                     HAS_ROWS: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)
        kv_len = tl.load(KvLens + t)
        if HAS_ROWS:
            row = tl.load(Rows + t).to(tl.int64)
        else:
            row = t.to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        # a padding entry (kv_len 0) wrote no partials: read none, store nothing
        mask_s = offs_s < tl.where(kv_len > 0, num_splits, 0)
        mask_d = offs_d < tl.where(kv_len > 0, HEAD_DIM, 0)
        lse = tl.load(PartLse + t * stride_lt + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
        m = tl.max(lse, 0)              # finite: split 0 always holds >= 1 key
        w = tl.math.exp2(lse - m)       # empty splits: exp2(-inf) = 0
        o = tl.load(PartO + t * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
        tl.store(Out + row * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _prefill_step(q, acc, m_i, l_i, start, pos, kv_end, offs_j, offs_d, mask_d, table, k_base, v_base,
                      qk_scale, stride_kb, stride_ko, stride_vb, stride_vo,
                      PAGE: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
        # one key tile of the online softmax; MASKED: the tile may hold keys past a row's position
        offs_n = start + offs_j
        if MASKED:
            mask_n = offs_n < kv_end
            blk = tl.load(table + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        else:
            blk = tl.load(table + offs_n // PAGE).to(tl.int64)
        slot = (offs_n % PAGE).to(tl.int64)
        k_ptr = k_base + (blk * stride_kb + slot * stride_ko)[:, None] + offs_d[None, :]
        v_ptr = v_base + (blk * stride_vb + slot * stride_vo)[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptr, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptr)
        else:
            k = tl.load(k_ptr, mask=mask_d[None, :], other=0.0)
        s = _scores(q, k, True, IEEE) * qk_scale
        if MASKED:
            s = tl.where(mask_n[None, :] & (offs_n[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))      # finite: key 0 is always visible
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptr)
        else:
            v = tl.load(v_ptr, mask=mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + _weighted(p, v, True, IEEE)
        return acc, m_new, l_i

    @triton.jit
    def prefill_kernel(Q, K, V, Tables, Tiles, Out,
                       qk_scale,
                       stride_qt, stride_qh,
                       stride_kb, stride_ko, stride_kh,
                       stride_vb, stride_vo, stride_vh,
                       stride_tab,
                       stride_ot, stride_oh,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        # program (tile, h): up to BLOCK_M consecutive query rows of one sequence (a tile of a
        # prefill chunk), query head h, against that sequence's keys 0 .. its last row's position.
        # Tiles run last first: a chunk's later tiles see more keys, so the long ones start early
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        h = tl.program_id(1)
        seq = tl.load(Tiles + tile * 4).to(tl.int64)
        row0 = tl.load(Tiles + tile * 4 + 1)
        n = tl.load(Tiles + tile * 4 + 2)
        pos0 = tl.load(Tiles + tile * 4 + 3)
        kvh = h // GROUP

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_j = tl.arange(0, BLOCK_N)
        mask_m = offs_m < n
        mask_d = offs_d < HEAD_DIM
        # rows past the tile's end repeat its first row's position: finite, never stored
        pos = pos0 + tl.where(mask_m, offs_m, 0)
        q = tl.load(Q + (row0 + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        table = Tables + seq * stride_tab
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
        kv_end = tl.where(n > 0, pos0 + n, 0)   # a padding tile (n == 0) loops over nothing
        # key tiles every row of the tile sees whole (keys <= pos0) need no mask; the rest do
        full_end = tl.minimum((pos0 + 1) // BLOCK_N * BLOCK_N, kv_end)
        for start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _prefill_step(q, acc, m_i, l_i, start, pos, kv_end, offs_j, offs_d, mask_d, table,
                                          k_base, v_base, qk_scale, stride_kb, stride_ko, stride_vb, stride_vo,
                                          PAGE, BLOCK_D == HEAD_DIM, False, IEEE)
        for start in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _prefill_step(q, acc, m_i, l_i, start, pos, kv_end, offs_j, offs_d, mask_d, table,
                                          k_base, v_base, qk_scale, stride_kb, stride_ko, stride_vb, stride_vo,
                                          PAGE, BLOCK_D == HEAD_DIM, True, IEEE)
        out = acc / l_i[:, None]
        tl.store(Out + (row0 + offs_m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])

    # triton resolves the helpers a kernel calls through its module's globals, not this closure
    globals().update(_scores=_scores, _weighted=_weighted, _prefill_step=_prefill_step)
    return split_kernel, merge_kernel, prefill_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@dataclass(frozen=True)
class DecodeConfig:
    """One launch of the decode kernel: ``splits`` programs per (entry, KV head), each over whole
    tiles of ``block_n`` keys; ``dot``: scores through tl.dot (query rows padded to 16) or through
    a broadcast product on the CUDA cores (rows = the GQA group, 1 for MHA)."""

    splits: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dot: bool = True


@dataclass(frozen=True)
class PrefillConfig:
    """One launch of the prefill kernel: tiles of ``block_m`` query rows, key tiles of ``block_n``."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Decode configs measured by ``benchmarks/scripts/attn_sweep.py`` on one H200 (its JSON under
# benchmarks/results/attn-sweep-cuda-20261204T1930.json; the script prints these lines, key ``decode_table``).
# Key: (head_dim, GQA group > 1). Value: (bound, config) pairs by increasing bound, where the
# bound is entries x kv_heads of a launch; the first bound >= the launch's applies, the last one
# past every bound. Shapes only, never the context: a captured graph replays one launch for any
# context, so each entry is the config best over contexts 1K-16K at that batch. Shapes the table
# lacks get ``_heuristic`` (the kernel's behaviour before the sweep).
DECODE_TABLE: dict[tuple[int, bool], tuple[tuple[int, DecodeConfig], ...]] = {
    # llama2-7b: bound = batch x 32 kv heads
    (128, False): (
        (32, DecodeConfig(splits=16, block_n=64, num_warps=4, num_stages=2, dot=True)),
        (64, DecodeConfig(splits=8, block_n=64, num_warps=4, num_stages=3, dot=True)),
        (128, DecodeConfig(splits=4, block_n=64, num_warps=4, num_stages=3, dot=True)),
        (256, DecodeConfig(splits=2, block_n=64, num_warps=4, num_stages=3, dot=True)),
        (512, DecodeConfig(splits=1, block_n=64, num_warps=4, num_stages=3, dot=True)),
        (1024, DecodeConfig(splits=1, block_n=64, num_warps=4, num_stages=3, dot=True)),
        (2048, DecodeConfig(splits=1, block_n=64, num_warps=4, num_stages=3, dot=True)),
    ),
    # mistral-7b: bound = batch x 8 kv heads
    (128, True): (
        (8, DecodeConfig(splits=64, block_n=32, num_warps=4, num_stages=2, dot=True)),
        (16, DecodeConfig(splits=16, block_n=128, num_warps=4, num_stages=3, dot=True)),
        (32, DecodeConfig(splits=16, block_n=64, num_warps=4, num_stages=3, dot=True)),
        (64, DecodeConfig(splits=8, block_n=64, num_warps=4, num_stages=3, dot=True)),
        (128, DecodeConfig(splits=4, block_n=64, num_warps=4, num_stages=3, dot=True)),
        (256, DecodeConfig(splits=1, block_n=128, num_warps=4, num_stages=3, dot=True)),
        (512, DecodeConfig(splits=1, block_n=64, num_warps=4, num_stages=3, dot=True)),
    ),
}

# The prefill kernel's tiles, from the same run (key ``prefill_config``): a 16K-token recompute's
# attention took 6.6-6.9 ms a layer in chunks of 512-2048 against 6.38 for one SDPA causal call.
PREFILL_CONFIG = PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
PREFILL_BLOCK_M = PREFILL_CONFIG.block_m     # query rows per prefill tile (graph layouts use it)


def _heuristic(items: int, head_dim: int, device: torch.device, max_splits: int = 16) -> DecodeConfig:
    """About two programs per SM; 64-key tiles (32 past head_dim 128), 4 warps, 2 stages."""
    splits = 1
    while items * splits < 2 * _sm_count(device) and splits < max_splits:
        splits *= 2
    return DecodeConfig(splits=splits, block_n=64 if head_dim <= 128 else 32)


def decode_config(entries: int, kv_heads: int, group: int, head_dim: int, device: torch.device) -> DecodeConfig:
    """The decode launch for ``entries`` query rows: from ``DECODE_TABLE``, else the heuristic.
    A function of shapes only: a captured graph and an eager call of one batch size agree."""
    items = entries * kv_heads
    rows = DECODE_TABLE.get((head_dim, group > 1))
    if not rows:
        return _heuristic(items, head_dim, device)
    for bound, cfg in rows:
        if items <= bound:
            return cfg
    return rows[-1][1]


def choose_splits(tokens: int, kv_heads: int, device: torch.device, max_splits: int = 16, group: int = 1,
                  head_dim: int = 128) -> int:
    """Splits per (token, KV head) of ``decode_config``; ``max_splits`` caps the heuristic only."""
    if DECODE_TABLE.get((head_dim, group > 1)):
        return decode_config(tokens, kv_heads, group, head_dim, device).splits
    return _heuristic(tokens * kv_heads, head_dim, device, max_splits).splits


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 token_seq: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                 num_splits: int | None = None, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """Attention of query rows over the paged context; returns ``out``.

    Without ``rows``: entry ``t`` is query row ``q[t]`` ([T, H, D]) over the first ``kv_lens[t]``
    tokens of sequence ``token_seq[t]``, whose blocks are ``block_tables[token_seq[t]]``; the
    result goes to ``out[t]`` (allocated [T, H, D] if None).

    With ``rows`` (int32 [n] on the device): entry ``t`` reads ``q[rows[t]]`` and writes
    ``out[rows[t]]`` (``out`` required, same shape as ``q``); ``token_seq``/``kv_lens`` are then
    [n], one per entry. Either way an entry with ``kv_len == 0`` stores nothing (a padding slot
    of a captured graph). The launch depends on shapes only: no host sync, graph-capturable.
    ``config`` (else ``decode_config``) sets the launch; ``num_splits`` overrides its splits."""
    H, D = q.shape[1], q.shape[2]
    _, page, kv_heads, dk = k_cache.shape
    if dk != D or v_cache.shape != k_cache.shape or H % kv_heads:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the pool's head_dim must be contiguous")
    if block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        raise ValueError("block tables must be int32 with contiguous rows")
    if token_seq.dtype != torch.int32 or kv_lens.dtype != torch.int32:
        raise ValueError("token_seq and kv_lens must be int32")
    n = token_seq.shape[0]
    if kv_lens.shape[0] != n:
        raise ValueError(f"token_seq has {n} entries, kv_lens {kv_lens.shape[0]}")
    if rows is not None:
        if rows.dtype != torch.int32 or rows.shape != (n,):
            raise ValueError(f"rows must be int32 [{n}] (one per entry of token_seq), got "
                             f"{rows.dtype} {tuple(rows.shape)}")
        if out is None:
            raise ValueError("paged_decode with rows writes into out: pass out ([T, H, D] like q)")
    elif q.shape[0] != n:
        raise ValueError(f"q has {q.shape[0]} rows, token_seq {n}: pass rows to pick a subset")
    if out is None:
        out = torch.empty((n, H, D), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with contiguous head_dim, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if n == 0:
        return out
    split_kernel, merge_kernel, _ = _kernels(os.environ.get("TRITON_INTERPRET") == "1")
    group = H // kv_heads
    cfg = config or decode_config(n, kv_heads, group, D, q.device)
    splits = num_splits or cfg.splits
    block_d = max(16, _pow2(D))
    # tl.dot needs 16 rows; the broadcast product holds group x block_n x block_d values
    block_h = max(16, _pow2(group)) if cfg.dot else _pow2(group)
    has_rows = rows is not None
    rows_arg = rows if has_rows else kv_lens      # never read without rows
    # with one split the partial buffers are never touched; a 1-element stand-in (float32, strides
    # of the same divisibility) keeps the kernel's signature, so it does not compile again
    part_o = torch.empty((n, H, splits, D) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((n, H, splits) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    po_strides = (H * splits * D, splits * D, D)
    lse_strides = (H * splits, splits)
    split_kernel[(n, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, token_seq, kv_lens, rows_arg, out, part_o, part_lse,
        scale * 1.4426950408889634, splits,   # log2(e): the kernel works in base 2
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        *po_strides, *lse_strides,
        GROUP=group, BLOCK_H=block_h, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_N=cfg.block_n,
        HAS_ROWS=has_rows, DOT=cfg.dot, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        merge_kernel[(n, H)](
            part_o, part_lse, kv_lens, rows_arg, out, splits,
            *po_strides, *lse_strides,
            out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, _pow2(splits)), HAS_ROWS=has_rows, num_warps=4,
        )
    return out


def prefill_tiles(spans, rows: list[int], seqs: list[int], device: torch.device, block_m: int = PREFILL_BLOCK_M
                  ) -> torch.Tensor:
    """[tiles, 4] int32 (sequence, first query row, rows, position of the first row): each
    prefill chunk cut into tiles of ``block_m`` rows, the prefill kernel's grid."""
    tiles = [(seq, row + off, min(block_m, s.new - off), s.start + off)
             for s, row, seq in zip(spans, rows, seqs) for off in range(0, s.new, block_m)]
    return torch.tensor(tiles, dtype=torch.int32).to(device, non_blocking=True)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  tiles: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                  block_m: int | None = None, config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal attention of prefill chunks read in place from the pool: each tile's query rows
    (``prefill_tiles``, cut at ``block_m`` rows: the config's unless given) against keys 0 .. its
    row's position of its sequence. Writes the tiles' rows of ``out`` ([T, H, D], allocated if
    None) and returns it; other rows are untouched, and a tile with 0 rows (padding of a
    captured graph) reads and stores nothing."""
    T, H, D = q.shape
    _, page, kv_heads, dk = k_cache.shape
    if dk != D or v_cache.shape != k_cache.shape or H % kv_heads:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the pool's head_dim must be contiguous")
    if block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1 or tiles.dtype != torch.int32:
        raise ValueError("block tables and tiles must be int32 with contiguous rows")
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if tiles.shape[0] == 0:
        return out
    cfg = config or PREFILL_CONFIG
    _, _, prefill_kernel = _kernels(os.environ.get("TRITON_INTERPRET") == "1")
    block_d = max(16, _pow2(D))
    prefill_kernel[(tiles.shape[0], H)](
        q, k_cache, v_cache, block_tables, tiles.contiguous(), out,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=H // kv_heads, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_M=block_m or cfg.block_m,
        BLOCK_N=cfg.block_n if block_d <= 128 else min(cfg.block_n, 32), IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# A chunk of at most this many new tokens (the second turn of a conversation: the pending token
# and a short prompt) goes through the decode kernel row by row, each token with its own causal
# length; longer chunks through the prefill kernel (tiles of rows reading each key once per tile).
SMALL_CHUNK = 16


class TritonPagedBackend(AttentionBackend):
    """Decode rows, and the rows of small prefill chunks, through the paged decode kernel;
    larger prefill chunks through the paged prefill kernel (``prefill="kernel"``) or through
    gather + SDPA (``prefill="gather"``: the reference's way, kept to measure against)."""

    name = "triton-paged"
    graph_safe = True

    def __init__(self, prefill: str = "kernel"):
        if prefill not in ("kernel", "gather"):
            raise ValueError(f"prefill must be 'kernel' or 'gather', not {prefill!r}")
        self.prefill = prefill

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        if meta.decode_only or meta.spans is None:
            return meta
        dec_rows, pre_spans, pre_rows, pre_seqs, row = [], [], [], [], 0
        for i, s in enumerate(meta.spans):
            if s.new <= SMALL_CHUNK:
                dec_rows.extend(range(row, row + s.new))
            else:
                pre_spans.append(s)
                pre_rows.append(row)
                pre_seqs.append(i)
            row += s.new
        if dec_rows:
            idx = torch.tensor(dec_rows, dtype=torch.long, device=meta.token_seq.device)
            meta.extra["decode"] = (idx.to(torch.int32), meta.token_seq[idx], meta.kv_lens[idx])
        meta.extra["prefill"] = (pre_spans, pre_rows)
        if self.prefill == "kernel" and pre_spans:
            meta.extra["tiles"] = prefill_tiles(pre_spans, pre_rows, pre_seqs, meta.token_seq.device)
        return meta

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if meta.decode_only or meta.spans is None:
            return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.token_seq, meta.kv_lens, scale)
        if "prefill" not in meta.extra:
            self.prepare(meta)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if "decode" in meta.extra:
            rows, seq, lens = meta.extra["decode"]
            paged_decode(q, k_cache, v_cache, meta.block_tables, seq, lens, scale, rows=rows, out=out)
        if "tiles" in meta.extra:
            paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.extra["tiles"], scale, out=out)
        else:
            spans, rows = meta.extra["prefill"]
            attend_spans(q, k_cache, v_cache, spans, rows, meta.block_size, scale, out)
        return out
