"""Step graphs' static layout (engine/graphs.py), without a GPU: on a CPU pool ``StepGraphs``
runs the body it would capture eagerly, from the same static buffer, with the paged kernels in
Triton's interpreter. Oracle: transformers' own greedy generate on each prompt alone."""

from __future__ import annotations


import pytest
import torch

from djinn.engine.graphs import DEFAULT_BUCKETS, buckets_up_to, decode_slots, tile_slots
from djinn.attention.triton_paged import PREFILL_BLOCK_M, SMALL_CHUNK

from tests.conftest import run_interpreted


def test_bucket_choice_covers_the_largest_step():
    assert buckets_up_to(1) == (1,)
    assert buckets_up_to(576)[-1] == 576
    assert buckets_up_to(600)[-1] == 640
    assert buckets_up_to(10_000) == DEFAULT_BUCKETS


@pytest.mark.parametrize("bucket", DEFAULT_BUCKETS)
def test_tile_slots_hold_any_mix_of_chunks(bucket):
    """Worst cases for the tiles: all chunks just past SMALL_CHUNK, or (where decode slots are
    fewer than rows) many small chunks overflowing the slots."""
    seqs = 64
    worst = []
    n = SMALL_CHUNK + 1
    worst.append(sum(-(-n // PREFILL_BLOCK_M) for _ in range(min(seqs, bucket // n))))
    if decode_slots(bucket, seqs) < bucket:
        worst.append(min(seqs, bucket) + bucket // PREFILL_BLOCK_M)
    assert tile_slots(bucket, seqs) >= max(worst)


def interpreted_run() -> None:
    """Run inside a process started with TRITON_INTERPRET=1."""
    from djinn.engine.graphs import StepGraphs
    from tests.conftest import loaded
    from tests.engine.batching import make, prompts_for, run_mixed
    from tests.engine.test_generate import hf_greedy

    lm = loaded("tiny-llama", dtype=torch.float32)
    lens = [1, 3, 17, 40, 70]
    prompts = prompts_for(lm, lens, seed=3)
    ex, pool = make(lm, blocks=200)
    graphs = StepGraphs(ex, pool, max_context=256, buckets=(4, 8, 16, 32, 64, 96), max_seqs=4)
    graphs.capture()
    seen = []
    run = graphs.run

    def counting(items):
        seen.append(sorted(len(it.tokens) for it in items))
        return run(items)

    graphs.run = counting
    got = run_mixed(ex, pool, prompts, 4, 40, arrive_every=1, graphs=graphs)
    for n, g, p in zip(lens, got, prompts):
        assert g == hf_greedy(lm.model, p, 4), f"prompt of {n} tokens"
    assert any(max(s) > SMALL_CHUNK and min(s) == 1 for s in seen), seen   # decode rows + a tiled chunk
    assert all(len(s) <= 4 for s in seen), seen                                # max_seqs held
    print("interpreted step graphs passed", len(seen), "steps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the captured graphs are tested instead")
def test_step_graph_layout_interpreted_equals_transformers():
    run_interpreted("tests.engine.test_graphs:interpreted_run", timeout=280)
