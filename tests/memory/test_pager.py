"""The host arena and the pager: block geometry, coalesced copies, data that comes back intact."""

from __future__ import annotations

import pytest
import torch

from djinn.errors import CapacityError
from djinn.memory.blocks import BlockPool, KVShape
from djinn.memory.host import HostArena
from djinn.memory.pager import IN, OUT, Pager, runs

from tests.conftest import requires_cuda

SHAPE = KVShape(num_layers=3, kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def test_runs_coalesce_consecutive_blocks_within_a_chunk():
    assert list(runs([5, 6, 7, 9], [0, 1, 2, 3], chunk_blocks=100)) == [(5, 0, 3), (9, 3, 1)]
    assert list(runs([1, 2, 3, 4], [6, 7, 8, 9], chunk_blocks=8)) == [(1, 6, 2), (3, 8, 2)]  # host chunk edge
    assert list(runs([3, 2, 1], [0, 1, 2], chunk_blocks=8)) == [(3, 0, 1), (2, 1, 1), (1, 2, 1)]
    assert list(runs([], [], chunk_blocks=8)) == []
    with pytest.raises(ValueError):
        list(runs([1], [], chunk_blocks=8))


def test_arena_hands_out_lowest_blocks_all_or_nothing():
    arena = HostArena(SHAPE, 10, chunk_bytes=4 * SHAPE.block_bytes)
    assert arena.capacity == 10 and arena.chunk_blocks == 4 and len(arena._chunks) == 3
    a = arena.allocate(3)
    b = arena.allocate(4)
    assert a == [0, 1, 2] and b == [3, 4, 5, 6]
    with pytest.raises(CapacityError, match="host arena is full"):
        arena.allocate(4)
    assert arena.free_count == 3            # the failed call took nothing
    arena.release(a)
    assert arena.allocate(2) == [0, 1]
    with pytest.raises(RuntimeError, match="not held"):
        arena.release([9])
    assert arena.run_view(4, 3).shape == (3, *arena.dims)
    with pytest.raises(ValueError, match="crosses a chunk"):
        arena.run_view(2, 3)


def test_arena_grows_in_the_background_chunk_by_chunk():
    arena = HostArena(SHAPE, 9, chunk_bytes=2 * SHAPE.block_bytes, background=True)
    assert arena.wait_ready(30)
    assert arena.capacity == 9 and arena.total_bytes == 9 * SHAPE.block_bytes and arena.error is None
    assert sorted(arena.allocate(9)) == list(range(9))
    arena.close()
    assert arena.capacity == 0


def _fill(pool: BlockPool, blocks: list[int]) -> None:
    gen = torch.Generator().manual_seed(sum(blocks))
    for b in blocks:
        pool.kv[b] = torch.randn(pool.kv.shape[1:], generator=gen)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])])
def test_park_and_restore_bring_back_the_same_bytes(device):
    pool = BlockPool(SHAPE, 32, torch.device(device))
    arena = HostArena(SHAPE, 20, pin=device == "cuda", chunk_bytes=6 * SHAPE.block_bytes)
    arena.wait_ready(60)
    pager = Pager(torch.device(device))
    try:
        src = [3, 4, 5, 6, 7, 8, 9, 12, 20]              # a contiguous run, then strays
        _fill(pool, src)
        before = pool.kv[src].clone()
        host = arena.allocate(len(src))
        out = pager.park(pool, src, arena, host)
        out.wait()
        assert out.done() and out.error is None and out.direction == OUT
        assert out.nbytes == len(src) * SHAPE.block_bytes and out.nblocks == len(src)
        assert out.ncopies == 4      # [3..8] -> host 0..5 fill one chunk; 9 -> 6 starts the next; 12; 20
        pool.kv[src] = 0.0                                # the device copy is gone
        dst = [30, 31, 1, 2, 10, 11, 13, 14, 15]
        back = pager.restore(arena, host, pool, dst)
        back.wait()
        assert back.direction == IN and back.ncopies >= 1
        assert torch.equal(pool.kv[dst].cpu(), before.cpu())
        pager.account(out)
        pager.account(back)
        st = pager.stats()
        assert st["out"]["transfers"] == 1 and st["out"]["bytes"] == out.nbytes
        assert st["in"]["bytes"] == back.nbytes and st["in"]["copy_seconds"] >= 0
        assert 0 < out.t_enqueued - out.t_submitted < 5
    finally:
        pager.close()
        arena.close()


@requires_cuda
@pytest.mark.gpu
def test_cuda_arena_is_pinned_and_copies_are_asynchronous():
    pool = BlockPool(SHAPE, 8, torch.device("cuda"))
    arena = HostArena(SHAPE, 8, pin=True)
    arena.wait_ready(60)
    assert arena.run_view(0, 1).is_pinned()
    pager = Pager(torch.device("cuda"))
    tr = pager.park(pool, [1, 2], arena, arena.allocate(2))
    assert tr._cuda_end is not None
    tr.wait()
    assert tr.done() and tr.copy_seconds >= 0
    pager.close()
    arena.close()
