"""GPU paged attention: a Triton flash-decoding kernel that reads K/V in place from the pool.

Written for Djinn's layout: a block holds all layers, so one layer's keys are the strided view
``pool[:, layer, 0]`` = ``[num_blocks, block_size, kv_heads, D]`` (block stride = all layers' K
and V of a block). The kernel never copies the context: each program walks its sequence's
block table and loads key/value tiles straight from the blocks they live in.

Work split (flash-decoding): program ``(t, g, s)`` handles query token ``t``, KV head ``g`` (with
all ``H / kv_heads`` query heads that share it, as one tile: GQA costs one read of K/V), and
split ``s`` of the token's context. Splits let a small batch fill the GPU; their partial
results (normalised output + log-sum-exp) are merged by a second small kernel. The number of
splits depends only on the number of query tokens (a shape), never on device data, so the
launch is identical at every replay of a captured CUDA graph; each program derives its range
from the token's ``kv_len``, read on the device.

Each query token carries its own ``kv_len`` (causality is per token), so the kernel serves
decode rows of any batch. Prefill chunks (many tokens of one sequence) go to the reference
gather + SDPA path, where the attention's own compute dominates the gather.

``triton`` is imported on first use only: CPU installs and tests never need it. With
``TRITON_INTERPRET=1`` set before first use, the same kernels run on CPU tensors (slowly).
"""

from __future__ import annotations

import functools
import os

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
    def split_kernel(Q, K, V, Tables, TokSeq, KvLens, Rows, Out, PartO, PartLse,
                     qk_scale,
                     stride_qt, stride_qh,
                     stride_kb, stride_ko, stride_kh,
                     stride_vb, stride_vo, stride_vh,
                     stride_tab,
                     stride_ot, stride_oh,
                     stride_pt, stride_ph, stride_ps,
                     stride_lt, stride_lh,
                     GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                     NUM_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr, IEEE: tl.constexpr):
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
        chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
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
            slot = offs_n % PAGE
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + blk[:, None] * stride_kb + slot[:, None] * stride_ko + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + blk[:, None] * stride_vb + slot[:, None] * stride_vo + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out_mask = mask_h[:, None] & mask_d[None, :]
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        if NUM_SPLITS == 1:
            tl.store(Out + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=out_mask)
        else:
            lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
            tl.store(PartO + t * stride_pt + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                     out, mask=out_mask)
            tl.store(PartLse + t * stride_lt + heads * stride_lh + split, lse, mask=mask_h)

    @triton.jit
    def merge_kernel(PartO, PartLse, KvLens, Rows, Out,
                     stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                     BLOCK_S: tl.constexpr, HAS_ROWS: tl.constexpr):
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
        mask_s = offs_s < tl.where(kv_len > 0, NUM_SPLITS, 0)
        mask_d = offs_d < tl.where(kv_len > 0, HEAD_DIM, 0)
        lse = tl.load(PartLse + t * stride_lt + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
        m = tl.max(lse, 0)              # finite: split 0 always holds >= 1 key
        w = tl.math.exp2(lse - m)       # empty splits: exp2(-inf) = 0
        o = tl.load(PartO + t * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
        tl.store(Out + row * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)

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
        # prefill chunk), query head h, against that sequence's keys 0 .. its last row's position
        tile = tl.program_id(0)
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
        q = tl.load(Q + (row0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        table = Tables + seq * stride_tab
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
        kv_end = tl.where(n > 0, pos0 + n, 0)   # a padding tile (n == 0) loops over nothing
        for start in range(0, kv_end, BLOCK_N):
            offs_n = start + offs_j
            mask_n = offs_n < kv_end
            blk = tl.load(table + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
            slot = offs_n % PAGE
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + blk[:, None] * stride_kb + slot[:, None] * stride_ko + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            causal = mask_n[None, :] & (offs_n[None, :] <= pos[:, None])
            s = tl.where(causal, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))      # finite: key 0 is always visible
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + blk[:, None] * stride_vb + slot[:, None] * stride_vo + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(Out + (row0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])

    return split_kernel, merge_kernel, prefill_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def choose_splits(tokens: int, kv_heads: int, device: torch.device, max_splits: int = 16) -> int:
    """Splits per (token, KV head) so the launch has about two programs per SM. A function of
    shapes only: a captured graph and an eager call of the same batch size launch the same."""
    splits = 1
    while tokens * kv_heads * splits < 2 * _sm_count(device) and splits < max_splits:
        splits *= 2
    return splits


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 token_seq: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                 num_splits: int | None = None, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of query rows over the paged context; returns ``out``.

    Without ``rows``: entry ``t`` is query row ``q[t]`` ([T, H, D]) over the first ``kv_lens[t]``
    tokens of sequence ``token_seq[t]``, whose blocks are ``block_tables[token_seq[t]]``; the
    result goes to ``out[t]`` (allocated [T, H, D] if None).

    With ``rows`` (int32 [n] on the device): entry ``t`` reads ``q[rows[t]]`` and writes
    ``out[rows[t]]`` (``out`` required, same shape as ``q``); ``token_seq``/``kv_lens`` are then
    [n], one per entry. Either way an entry with ``kv_len == 0`` stores nothing (a padding slot
    of a captured graph). The launch depends on shapes only: no host sync, graph-capturable."""
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
    block_h = max(16, _pow2(group))
    block_d = max(16, _pow2(D))
    block_n = 64 if block_d <= 128 else 32
    splits = num_splits or choose_splits(n, kv_heads, q.device)
    has_rows = rows is not None
    rows_arg = rows if has_rows else kv_lens      # never read without rows
    if splits > 1:
        part_o = torch.empty((n, H, splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n, H, splits), dtype=torch.float32, device=q.device)
    else:
        part_o, part_lse = out, out   # not touched when there is one split
    ieee = q.dtype == torch.float32
    split_kernel[(n, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, token_seq, kv_lens, rows_arg, out, part_o, part_lse,
        scale * 1.4426950408889634,   # log2(e): the kernel works in base 2
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2) if splits > 1 else 0,
        part_lse.stride(0), part_lse.stride(1),
        GROUP=group, BLOCK_H=block_h, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_N=block_n,
        NUM_SPLITS=splits, HAS_ROWS=has_rows, IEEE=ieee, num_warps=4, num_stages=2,
    )
    if splits > 1:
        merge_kernel[(n, H)](
            part_o, part_lse, kv_lens, rows_arg, out,
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=block_d, NUM_SPLITS=splits, BLOCK_S=max(2, _pow2(splits)),
            HAS_ROWS=has_rows, num_warps=4,
        )
    return out


PREFILL_BLOCK_M = 64     # query rows per program of the prefill kernel


def prefill_tiles(spans, rows: list[int], seqs: list[int], device: torch.device, block_m: int = PREFILL_BLOCK_M
                  ) -> torch.Tensor:
    """[tiles, 4] int32 (sequence, first query row, rows, position of the first row): each
    prefill chunk cut into tiles of ``block_m`` rows, the prefill kernel's grid."""
    tiles = [(seq, row + off, min(block_m, s.new - off), s.start + off)
             for s, row, seq in zip(spans, rows, seqs) for off in range(0, s.new, block_m)]
    return torch.tensor(tiles, dtype=torch.int32).to(device, non_blocking=True)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  tiles: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                  block_m: int = PREFILL_BLOCK_M) -> torch.Tensor:
    """Causal attention of prefill chunks read in place from the pool: each tile's query rows
    (``prefill_tiles``) against keys 0 .. its row's position of its sequence. Writes the tiles'
    rows of ``out`` ([T, H, D], allocated if None) and returns it; other rows are untouched, and
    a tile with 0 rows (padding of a captured graph) reads and stores nothing."""
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
        GROUP=H // kv_heads, HEAD_DIM=D, BLOCK_D=block_d, PAGE=page, BLOCK_M=block_m,
        BLOCK_N=64 if block_d <= 128 else 32, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
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
