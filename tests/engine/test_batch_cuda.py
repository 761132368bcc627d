"""Batched forwards on CUDA: the paged Triton kernel inside the model, captured decode graphs
against eager steps, and greedy equality with transformers run on each session alone."""

from __future__ import annotations

import pytest
import torch

from djinn.engine.batch import BatchItem
from djinn.engine.graphs import StepGraphs

from tests.conftest import loaded, requires_cuda
from tests.engine.batching import PROMPT_LENS, make, move_blocks, prompts_for, run_mixed
from tests.engine.test_generate import hf_greedy

pytestmark = [pytest.mark.gpu, requires_cuda]
NEW = 6


@pytest.mark.parametrize("chunk", [7, 16])
def test_cuda_mixed_batches_equal_transformers_alone(chunk):
    lm = loaded("tiny-llama", device="cuda", dtype=torch.float32)
    prompts = prompts_for(lm)
    ex, pool = make(lm, blocks=600)

    def on_step(step, seqs):
        if step == 25:
            move_blocks(pool, seqs[3])

    got = run_mixed(ex, pool, prompts, NEW, chunk, on_step=on_step)
    for n, g, p in zip(PROMPT_LENS, got, prompts):
        assert g == hf_greedy(lm.model, p, NEW), f"prompt of {n} tokens"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_graph_replay_equals_eager(dtype):
    lm = loaded("tiny-llama", device="cuda", dtype=dtype)
    ex, pool = make(lm, blocks=300)
    graphs = StepGraphs(ex, pool, max_context=512, buckets=(1, 2, 4, 8))
    graphs.capture()
    assert graphs.captured == (1, 2, 4, 8)
    prompts = prompts_for(lm, [3, 16, 40, 77, 100], seed=2)
    tables = [pool.allocate(8) for _ in prompts]
    starts = [len(p) for p in prompts]
    logits = ex.forward_batch(pool, [BatchItem(t, 0, p) for t, p in zip(tables, prompts)])
    toks = [int(lg[-1].argmax()) for lg in logits]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    null_before = pool.kv[1:].clone()
    for step in range(6):
        items = [BatchItem(t, s, [k]) for t, s, k in zip(tables, starts, toks)]
        eager = ex.forward_batch(pool, items)                     # writes this step's K/V
        replay = ex.forward_batch(pool, items, graphs=graphs)     # same K/V again (bucket 8: 3 padded rows)
        for e, r in zip(eager, replay):
            torch.testing.assert_close(r, e, **tol)
        if dtype == torch.float32:
            assert [int(r[-1].argmax()) for r in replay] == [int(e[-1].argmax()) for e in eager]
        toks = [int(e[-1].argmax()) for e in eager]
        starts = [s + 1 for s in starts]
    # padded rows only ever wrote the null block: blocks nobody holds are untouched
    free = sorted(set(range(1, pool.num_blocks)) - {b for t in tables for b in t})
    idx = torch.tensor(free, device="cuda") - 1
    assert torch.equal(pool.kv[1:][idx], null_before[idx])


def test_graphs_in_a_mixed_run_equal_transformers_alone():
    lm = loaded("tiny-llama", device="cuda", dtype=torch.float32)
    prompts = prompts_for(lm, PROMPT_LENS[:12])
    ex, pool = make(lm, blocks=400)
    graphs = StepGraphs(ex, pool, max_context=512, buckets=(4, 8, 16))
    graphs.capture()
    got = run_mixed(ex, pool, prompts, 10, 16, arrive_every=1, graphs=graphs)
    for n, g, p in zip(PROMPT_LENS, got, prompts):
        assert g == hf_greedy(lm.model, p, 10), f"prompt of {n} tokens"


MIXES = [
    [(100, 1), (200, 1), (301, 1)],                        # decodes only
    [(100, 1), (200, 1), (0, 65)],                         # decodes + a chunk of two tiles
    [(40, 1), (3, 9), (0, 16), (120, 17)],                 # small chunks as decode slots, a 17-token chunk
    [(10, 1), (0, 100), (50, 70), (7, 1), (300, 5)],       # two tiled chunks between decodes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_mixed_step_graph_equals_eager(dtype, mix):
    """A step of decode rows and prefill chunks replayed from a captured graph gives the
    logits of the same step run eagerly, and writes the same K/V."""
    lm = loaded("tiny-llama", device="cuda", dtype=dtype)
    ex, pool = make(lm, blocks=300)
    graphs = StepGraphs(ex, pool, max_context=512, buckets=(8, 32, 128, 256), max_seqs=8)
    graphs.capture()
    g = torch.Generator().manual_seed(mix)
    items = []
    for start, n in MIXES[mix]:
        table = pool.allocate(-(-(start + n) // 16))
        ctx = torch.randint(3, 200, (start,), generator=g).tolist()
        if start:
            ex.forward_batch(pool, [BatchItem(table, 0, ctx)])       # the context's K/V
        items.append(BatchItem(table, start, torch.randint(3, 200, (n,), generator=g).tolist()))
    assert graphs.accepts(items)
    eager = ex.forward_batch(pool, items)
    kv_eager = pool.kv.clone()
    replay = ex.forward_batch(pool, items, graphs=graphs)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for e, r in zip(eager, replay):
        torch.testing.assert_close(r, e[-1:], **tol)
    used = sorted({b for it in items for b in it.block_table})
    torch.testing.assert_close(pool.kv[used], kv_eager[used], **tol)


def test_step_graphs_in_a_mixed_run_equal_transformers_alone():
    """Chunks of 40 tokens (tiles) and decodes, every step replayed where a bucket fits."""
    lm = loaded("tiny-llama", device="cuda", dtype=torch.float32)
    prompts = prompts_for(lm, PROMPT_LENS[:12])
    ex, pool = make(lm, blocks=400)
    graphs = StepGraphs(ex, pool, max_context=512, buckets=(8, 16, 32, 64, 96, 128), max_seqs=16)
    graphs.capture()
    got = run_mixed(ex, pool, prompts, 10, 40, arrive_every=1, graphs=graphs)
    for n, g, p in zip(PROMPT_LENS, got, prompts):
        assert g == hf_greedy(lm.model, p, 10), f"prompt of {n} tokens"
