"""Many sessions per forward (Executor.forward_batch) against transformers run on each session
alone: greedy tokens must be identical (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from djinn.engine.batch import BatchItem, begin_batch, finish_batch, run_batch_layers, split_batch

from tests.conftest import loaded, requires_smollm2
from tests.engine.batching import PROMPT_LENS, make, move_blocks, prompts_for, run_mixed
from tests.engine.test_generate import hf_greedy

NEW = 6


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: two OpenMP threads on two busy cores cost ~20x one thread here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_ORACLE: dict = {}


def oracle(name: str, prompts, new: int = NEW) -> list[list[int]]:
    key = (name, new)
    if key not in _ORACLE:
        lm = loaded(name)
        _ORACLE[key] = [hf_greedy(lm.model, p, new) for p in prompts]
    return _ORACLE[key]


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_tiny_llama_mixed_batches_equal_transformers_alone(chunk):
    lm = loaded("tiny-llama")
    prompts = prompts_for(lm)
    ex, pool = make(lm)
    free = pool.free_count
    got = run_mixed(ex, pool, prompts, NEW, chunk)
    want = oracle("tiny-llama", prompts)
    for n, g, w in zip(PROMPT_LENS, got, want):
        assert g == w, f"prompt of {n} tokens, chunk {chunk}"
    assert pool.free_count == free


@requires_smollm2
# ~15 s per chunk size on two CPU cores: the block size runs by default, 7 and 1 with -m slow
@pytest.mark.parametrize("chunk", [16, pytest.param(7, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow)])
def test_smollm2_mixed_batches_equal_transformers_alone(chunk):
    lm = loaded("smollm2-135m")
    prompts = prompts_for(lm)
    ex, pool = make(lm)
    got = run_mixed(ex, pool, prompts, NEW, chunk, arrive_every=1)
    want = oracle("smollm2-135m", prompts)
    for n, g, w in zip(PROMPT_LENS, got, want):
        assert g == w, f"prompt of {n} tokens, chunk {chunk}"


def test_gpt2_learned_positions_in_a_packed_batch():
    lm = loaded("tiny-gpt2")
    prompts = prompts_for(lm, [3, 16, 40, 90], seed=3)
    ex, pool = make(lm)
    assert run_mixed(ex, pool, prompts, NEW, 16) == [hf_greedy(lm.model, p, NEW) for p in prompts]


def test_blocks_moved_mid_run_continue_unchanged():
    lm = loaded("tiny-llama")
    prompts = prompts_for(lm)
    ex, pool = make(lm, blocks=600)
    moved = []

    def on_step(step, seqs):
        # move sessions mid-prefill (13: 129 tokens) and mid-decode (2: 5 tokens) to new blocks
        if step == 30:
            for i in (2, 13):
                assert seqs[i].table and seqs[i].cached > 0
                move_blocks(pool, seqs[i])
                moved.append(i)

    got = run_mixed(ex, pool, prompts, NEW, 7, on_step=on_step)
    assert moved == [2, 13]
    assert got == oracle("tiny-llama", prompts)


def test_hooks_touch_only_their_items_rows():
    lm = loaded("tiny-llama")
    ex, pool = make(lm)
    prompts = prompts_for(lm, [9, 20, 4], seed=5)
    tables = [pool.allocate(2) for _ in prompts]

    def scale(layer, h):
        return h * 0.5 if layer == 1 else h

    items = [BatchItem(t, 0, p, all_logits=True) for t, p in zip(tables, prompts)]
    items[1].hook = scale
    logits = ex.forward_batch(pool, items)

    # oracle: transformers' own forward, the middle prompt with a forward hook written here
    model = lm.model
    for i, p in enumerate(prompts):
        handle = None
        if i == 1:
            handle = ex.arch.layers[1].register_forward_hook(
                lambda m, a, out: (out[0] * 0.5, *out[1:]) if isinstance(out, tuple) else out * 0.5)
        try:
            with torch.no_grad():
                want = model(torch.tensor([p])).logits[0].float()
        finally:
            if handle is not None:
                handle.remove()
        assert logits[i].shape == want.shape
        torch.testing.assert_close(logits[i], want, atol=1e-4, rtol=1e-4)


def test_split_batch_takes_an_item_out_mid_forward():
    lm = loaded("tiny-llama")
    ex, pool = make(lm)
    prompts = prompts_for(lm, [5, 18, 33], seed=9)
    tables = [pool.allocate(3) for _ in prompts]
    items = [BatchItem(t, 0, p) for t, p in zip(tables, prompts)]
    whole = ex.forward_batch(pool, items)
    with torch.inference_mode():
        st = begin_batch(ex, pool, items)
        run_batch_layers(ex, st, until=0)          # a "breakpoint" after layer 0
        alone, rest = split_batch(ex, st, [1])
        run_batch_layers(ex, rest)
        run_batch_layers(ex, alone)                # resumed later, on its own
        parts = finish_batch(ex, rest), finish_batch(ex, alone)
    torch.testing.assert_close(parts[1][0], whole[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[0][0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[0][1], whole[2], atol=1e-5, rtol=1e-5)


def test_bad_batches_are_refused_before_anything_runs():
    lm = loaded("tiny-llama")
    ex, pool = make(lm)
    before = pool.kv.clone()
    t = pool.allocate(1)
    with pytest.raises(ValueError, match="block table"):
        ex.forward_batch(pool, [BatchItem(t, 10, list(range(3, 13)))])      # 20 tokens, one block
    with pytest.raises(ValueError, match="null block"):
        ex.forward_batch(pool, [BatchItem([0], 0, [5])])
    with pytest.raises(ValueError, match="new token"):
        ex.forward_batch(pool, [BatchItem(t, 0, [])])
    with pytest.raises(ValueError, match="empty"):
        ex.forward_batch(pool, [])
    assert torch.equal(pool.kv, before)


def test_single_session_path_is_untouched_by_batching(tiny_llama):
    """A batched forward leaves the model on transformers' own attention afterwards."""
    lm = tiny_llama
    ex, pool = make(lm)
    impl = lm.model.config._attn_implementation
    ex.forward_batch(pool, [BatchItem(pool.allocate(1), 0, [5, 6, 7])])
    assert lm.model.config._attn_implementation == impl
