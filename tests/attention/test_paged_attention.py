"""Paged attention against a naive oracle written here (per token: look up each key through the
block table, softmax in float64). CPU: the reference backend, and the Triton kernel through
Triton's interpreter when triton is installed. GPU (gpu-marked): the compiled kernel in
float16/bfloat16 against the float32 reference on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch

from djinn.attention.base import SeqSpan, build_metadata
from djinn.attention.reference import ReferenceBackend

from tests.conftest import requires_cuda, run_interpreted

BS = 16


def make_case(heads, kv_heads, dim, shapes, dtype=torch.float32, device="cpu", layers=3, layer=1, seed=0):
    """A pool with every sequence's blocks scattered at random; ``shapes`` = [(start, new)]."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-(s + n) // BS) for s, n in shapes)
    nb = need + 5
    pool = torch.randn(nb, layers, 2, BS, kv_heads, dim, generator=g).to(dtype).to(device)
    perm = (torch.randperm(nb - 1, generator=g) + 1).tolist()   # never block 0
    spans, used = [], 0
    for s, n in shapes:
        k = -(-(s + n) // BS)
        spans.append(SeqSpan(s, n, perm[used:used + k]))
        used += k
    meta = build_metadata(spans, BS, torch.device(device))
    q = torch.randn(meta.num_tokens, heads, dim, generator=g).to(dtype).to(device)
    return q, pool[:, layer, 0], pool[:, layer, 1], meta


def naive(q, kc, vc, spans, scale):
    q, kc, vc = q.double().cpu(), kc.double().cpu(), vc.double().cpu()
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], kc.shape[2]
    row = 0
    for sp in spans:
        for i in range(sp.new):
            n = sp.start + i + 1
            keys = torch.stack([kc[sp.table[p // BS], p % BS] for p in range(n)])     # [n, Hkv, D]
            vals = torch.stack([vc[sp.table[p // BS], p % BS] for p in range(n)])
            for h in range(heads):
                g = h // (heads // kv_heads)
                w = torch.softmax(keys[:, g] @ q[row, h] * scale, 0)
                out[row, h] = w @ vals[:, g]
            row += 1
    return out


MIXED = [(0, 1), (15, 1), (16, 1), (40, 1), (0, 9), (20, 7), (47, 1), (5, 16)]
DECODE = [(0, 1), (15, 1), (16, 1), (31, 1), (32, 1), (100, 1), (7, 1)]
CHUNKS = [(0, 40), (20, 70), (5, 17), (100, 33)]     # past SMALL_CHUNK: the prefill kernel


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (4, 4, 32), (8, 1, 64)])
def test_reference_equals_naive(heads, kv_heads, dim):
    q, kc, vc, meta = make_case(heads, kv_heads, dim, MIXED)
    out = ReferenceBackend().attend(q, kc, vc, meta, 0.3)
    torch.testing.assert_close(out.double(), naive(q, kc, vc, meta.spans, 0.3), atol=1e-5, rtol=1e-5)


def test_decode_config_from_table(monkeypatch):
    """The table is looked up by (head_dim, GQA or not) and entries x kv_heads; shapes it lacks
    get the heuristic (two programs per SM), and choose_splits agrees with the config."""
    from djinn.attention import triton_paged as tp

    small, big = tp.DecodeConfig(8, block_n=32, dot=False), tp.DecodeConfig(1, block_n=128, num_warps=8)
    monkeypatch.setattr(tp, "DECODE_TABLE", {(128, False): ((32, small), (256, big))})
    cpu = torch.device("cpu")
    assert tp.decode_config(1, 32, 1, 128, cpu) == small
    assert tp.decode_config(2, 32, 1, 128, cpu) == big
    assert tp.decode_config(64, 32, 1, 128, cpu) == big            # past the last bound
    assert tp.choose_splits(1, 32, cpu, group=1) == 8
    gqa = tp.decode_config(1, 8, 4, 128, cpu)                        # no GQA rows: the heuristic
    assert gqa == tp._heuristic(8, 128, cpu) and gqa.splits * 8 >= 2 * tp._sm_count(cpu)
    assert tp.PREFILL_BLOCK_M == tp.PREFILL_CONFIG.block_m


def interpreted_checks() -> None:
    """Run inside a process started with TRITON_INTERPRET=1 (triton reads it at import time)."""
    from djinn.attention import triton_paged as tp

    for heads, kv_heads, dim, splits in [(4, 2, 16, 1), (4, 2, 16, 4), (8, 1, 64, 2)]:
        q, kc, vc, meta = make_case(heads, kv_heads, dim, DECODE, seed=splits)
        out = tp.paged_decode(q, kc, vc, meta.block_tables, meta.token_seq, meta.kv_lens, 0.25, num_splits=splits)
        torch.testing.assert_close(out.double(), naive(q, kc, vc, meta.spans, 0.25), atol=1e-5, rtol=1e-5)
    # the launch configs the sweep chooses among: CUDA-core scores (MHA and GQA), key tiles of
    # 16-128 (a page split across tiles, several pages a tile), an odd head_dim, 3 splits
    for heads, kv_heads, dim, cfg in [(4, 4, 16, tp.DecodeConfig(3, block_n=16, dot=False)),
                                      (4, 2, 24, tp.DecodeConfig(2, block_n=32, dot=False)),
                                      (4, 1, 16, tp.DecodeConfig(1, block_n=128, num_warps=8, num_stages=3)),
                                      (2, 2, 24, tp.DecodeConfig(4, block_n=16))]:
        q, kc, vc, meta = make_case(heads, kv_heads, dim, DECODE, seed=dim)
        out = tp.paged_decode(q, kc, vc, meta.block_tables, meta.token_seq, meta.kv_lens, 0.25, config=cfg)
        torch.testing.assert_close(out.double(), naive(q, kc, vc, meta.spans, 0.25), atol=1e-5, rtol=1e-5)
    # a subset of rows of a bigger q (rows=), padding entries (kv_len 0) that store nothing
    for heads, kv_heads, dim, splits in [(4, 2, 16, 1), (4, 4, 32, 3)]:
        q, kc, vc, meta = make_case(heads, kv_heads, dim, DECODE, seed=10 + splits)
        ref = naive(q, kc, vc, meta.spans, 0.25)
        picked = [5, 0, 3, 6]
        rows = torch.tensor(picked + [1, 2], dtype=torch.int32)        # last two: padding
        seq = torch.cat([meta.token_seq[picked], torch.zeros(2, dtype=torch.int32)])
        lens = torch.cat([meta.kv_lens[picked], torch.zeros(2, dtype=torch.int32)])
        out = torch.full_like(q, 7.0)
        got = tp.paged_decode(q, kc, vc, meta.block_tables, seq, lens, 0.25, num_splits=splits, rows=rows, out=out)
        assert got is out
        torch.testing.assert_close(out[picked].double(), ref[picked], atol=1e-5, rtol=1e-5)
        untouched = [r for r in range(q.shape[0]) if r not in picked]
        assert (out[untouched] == 7.0).all(), "a padding entry or an unpicked row was written"
    # prefill chunks: tiles of 16 rows (a chunk's last tile partly full), causal inside the chunk
    for heads, kv_heads, dim in [(4, 2, 16), (2, 2, 32)]:
        q, kc, vc, meta = make_case(heads, kv_heads, dim, CHUNKS, seed=heads)
        seqs = list(range(len(CHUNKS)))
        rows = [sum(n for _, n in CHUNKS[:i]) for i in seqs]
        tiles = tp.prefill_tiles(meta.spans, rows, seqs, q.device, block_m=16)
        out = tp.paged_prefill(q, kc, vc, meta.block_tables, tiles, 0.25, block_m=16)
        torch.testing.assert_close(out.double(), naive(q, kc, vc, meta.spans, 0.25), atol=1e-5, rtol=1e-5)
    # key tiles of 16 (most of a long chunk's keys in the unmasked loop), an odd head_dim
    q, kc, vc, meta = make_case(4, 2, 24, CHUNKS, seed=5)
    tiles = tp.prefill_tiles(meta.spans, rows, seqs, q.device, block_m=32)
    out = tp.paged_prefill(q, kc, vc, meta.block_tables, tiles, 0.25, config=tp.PrefillConfig(32, 16, 4, 3))
    torch.testing.assert_close(out.double(), naive(q, kc, vc, meta.spans, 0.25), atol=1e-5, rtol=1e-5)
    # padding tiles (0 rows, pointing at real rows and positions) store nothing
    pad = torch.tensor([[0, 0, 0, 0], [1, 40, 0, 20], [3, 117, 0, 100]], dtype=torch.int32)
    out = torch.full_like(q, 7.0)
    tp.paged_prefill(q, kc, vc, meta.block_tables, pad, 0.25, out=out, block_m=16)
    assert (out == 7.0).all(), "a padding tile stored rows"
    q, kc, vc, meta = make_case(4, 2, 16, MIXED + CHUNKS, dtype=torch.float16, seed=4)
    be = tp.TritonPagedBackend()
    out = be.attend(q, kc, vc, be.prepare(meta), 0.25)
    torch.testing.assert_close(out.double(), naive(q, kc, vc, meta.spans, 0.25), atol=2e-3, rtol=1e-2)
    print("interpreted kernel checks passed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel is tested instead")
def test_triton_kernel_interpreted_equals_naive():
    """The Triton kernels, run by Triton's CPU interpreter (float32 exact-ish, float16, GQA,
    1-4 splits, the launch configs a sweep may pick, rows=/out= with padding entries and
    padding tiles, a mixed batch through the backend)."""
    run_interpreted("tests.attention.test_paged_attention:interpreted_checks", timeout=240)


# ---- GPU -----------------------------------------------------------------------------
TOL = {torch.float16: dict(atol=3e-3, rtol=1e-2), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LONG = [(0, 1), (15, 1), (16, 1), (17, 1), (511, 1), (1023, 1), (2047, 1), (300, 1), (1, 1)]
# chunks past triton_paged.SMALL_CHUNK (the prefill kernel, or gather + SDPA); MIXED's chunks go
# through the decode kernel
BIG = [(10, 40), (600, 33), (2000, 17), (0, 512), (1100, 65), (3000, 200)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 32, 128), (32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("splits", [None, 1, 3, 16])
def test_gpu_kernel_equals_reference(dtype, heads, kv_heads, dim, splits):
    from djinn.attention.triton_paged import paged_decode

    q, kc, vc, meta = make_case(heads, kv_heads, dim, LONG, dtype=dtype, device="cuda", layers=4, layer=2)
    scale = 1 / math.sqrt(dim)
    out = paged_decode(q, kc, vc, meta.block_tables, meta.token_seq, meta.kv_lens, scale, num_splits=splits)
    ref = ReferenceBackend().attend(q.float(), kc.float(), vc.float(), meta, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefill", ["kernel", "gather"])
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32)])
def test_gpu_backend_mixed_batch_equals_reference(dtype, prefill, heads, kv_heads):
    from djinn.attention.triton_paged import TritonPagedBackend

    q, kc, vc, meta = make_case(heads, kv_heads, 128, MIXED + LONG + BIG, dtype=dtype, device="cuda")
    be = TritonPagedBackend(prefill=prefill)
    out = be.attend(q, kc, vc, be.prepare(meta), 0.088)
    ref = ReferenceBackend().attend(q.float(), kc.float(), vc.float(), meta, 0.088)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("splits", [1, 4])
def test_gpu_rows_and_padding_in_a_graph(splits):
    """rows= picks a subset of a packed batch's rows; kv_len 0 entries (graph padding) store
    nothing; the call captures into a CUDA graph, and a replay after the contexts changed in
    place computes what an eager call over the new contexts does."""
    from djinn.attention.triton_paged import paged_decode

    q, kc, vc, meta = make_case(32, 8, 128, LONG, dtype=torch.float16, device="cuda")
    ref = ReferenceBackend().attend(q.float(), kc.float(), vc.float(), meta, 0.088)
    picked = [8, 2, 5, 0]
    rows = torch.tensor(picked + [1, 1], dtype=torch.int32, device="cuda")
    seq = torch.cat([meta.token_seq[picked], torch.zeros(2, dtype=torch.int32, device="cuda")])
    lens = torch.cat([meta.kv_lens[picked], torch.zeros(2, dtype=torch.int32, device="cuda")])
    out = torch.full_like(q, 7.0)
    run = lambda: paged_decode(q, kc, vc, meta.block_tables, seq, lens, 0.088, num_splits=splits,  # noqa: E731
                               rows=rows, out=out)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    out.fill_(7.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out[picked].float(), ref[picked], **TOL[torch.float16])
    untouched = [r for r in range(q.shape[0]) if r not in picked]
    assert (out[untouched] == 7.0).all()
    # new contexts, same launch: shorter ones, and an entry that becomes padding
    lens.copy_(torch.tensor([1, 5, 0, 17, 0, 0], dtype=torch.int32))
    graph.replay()
    eager = torch.full_like(q, 7.0)
    paged_decode(q, kc, vc, meta.block_tables, seq, lens, 0.088, num_splits=splits, rows=rows, out=eager)
    torch.cuda.synchronize()
    live = [8, 2, 0]
    torch.testing.assert_close(out[live], eager[live])
    assert (eager[5] == 7.0).all()
    torch.testing.assert_close(out[5].float(), ref[5], **TOL[torch.float16])   # kept from the first replay


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("splits,block_n,warps,stages,dot", [(1, 16, 4, 1, False), (4, 32, 8, 1, False),
                                                            (8, 128, 8, 3, True), (3, 16, 4, 2, True),
                                                            (2, 64, 8, 2, True)])
def test_gpu_decode_configs_equal_reference(dtype, heads, kv_heads, splits, block_n, warps, stages, dot):
    """Every kind of launch the sweep may write into DECODE_TABLE."""
    from djinn.attention.triton_paged import DecodeConfig, paged_decode

    config = DecodeConfig(splits, block_n=block_n, num_warps=warps, num_stages=stages, dot=dot)
    q, kc, vc, meta = make_case(heads, kv_heads, 128, LONG, dtype=dtype, device="cuda", layers=2)
    out = paged_decode(q, kc, vc, meta.block_tables, meta.token_seq, meta.kv_lens, 0.088, config=config)
    ref = ReferenceBackend().attend(q.float(), kc.float(), vc.float(), meta, 0.088)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("block_m,block_n,warps,stages", [(128, 64, 8, 3), (64, 32, 4, 3), (128, 128, 8, 2),
                                                          (64, 128, 8, 2)])
def test_gpu_prefill_configs_equal_reference(heads, kv_heads, block_m, block_n, warps, stages):
    """The prefill tiles the sweep may choose, chunks at offsets that are and are not multiples
    of the key tile (unmasked and diagonal key tiles)."""
    from djinn.attention import triton_paged as tp

    q, kc, vc, meta = make_case(heads, kv_heads, 128, BIG, dtype=torch.float16, device="cuda")
    seqs = list(range(len(BIG)))
    rows = [sum(n for _, n in BIG[:i]) for i in seqs]
    tiles = tp.prefill_tiles(meta.spans, rows, seqs, q.device, block_m=block_m)
    out = tp.paged_prefill(q, kc, vc, meta.block_tables, tiles, 0.088,
                           config=tp.PrefillConfig(block_m, block_n, warps, stages))
    ref = ReferenceBackend().attend(q.float(), kc.float(), vc.float(), meta, 0.088)
    torch.testing.assert_close(out.float(), ref, **TOL[torch.float16])
