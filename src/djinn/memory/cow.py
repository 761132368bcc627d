"""Copy-on-write of shared KV blocks.

A fork shares its parent's blocks (``BlockPool.share``): the same physical block appears in
several sessions' block tables, with a reference count per holder. Shared blocks are
read-only. Before a forward writes K/V of positions ``[start, end)`` of a session, every block
of its table covering that range must be *private* (reference count 1); ``shared_in_range``
says which are not, and ``privatize`` gives the session a copy of each (a new block with
the old one's contents, all layers) and drops its reference to the original.

In practice only the partly filled last block of a fork is ever copied (new tokens go to
fresh blocks), or the block a truncation cut through.

The copy runs on the current stream, after the compute that wrote the source and before the
compute that writes the copy, so no extra synchronization is needed. The caller (the
residency, under its lock) allocates the fresh blocks, making room as for any other growth.
"""

from __future__ import annotations

import torch

from djinn.memory.blocks import BlockPool


def shared_in_range(pool: BlockPool, table: list[int], start: int, end: int) -> list[int]:
    """Indices into ``table`` of shared blocks that a write of positions ``[start, end)`` touches."""
    if end <= start:
        return []
    bs = pool.shape.block_size
    first, last = start // bs, min(len(table), -(-end // bs))
    return [i for i in range(first, last) if pool.refcount(table[i]) > 1]


def copy_blocks(pool: BlockPool, src: list[int], dst: list[int]) -> None:
    """``dst[i]`` gets the contents of ``src[i]`` (every layer, K and V)."""
    if not src:
        return
    device = pool.kv.device
    s = torch.tensor(src, dtype=torch.long, device=device)
    d = torch.tensor(dst, dtype=torch.long, device=device)
    with torch.no_grad():
        pool.kv.index_copy_(0, d, pool.kv.index_select(0, s))


def privatize(pool: BlockPool, table: list[int], indices: list[int], fresh: list[int]) -> None:
    """Replace ``table[i]`` for ``i`` in ``indices`` by a copy in ``fresh`` (allocated by the
    caller, one per index) and drop the table's reference to the original."""
    if len(indices) != len(fresh):
        raise ValueError("privatize needs one fresh block per shared block")
    old = [table[i] for i in indices]
    copy_blocks(pool, old, fresh)
    for i, b in zip(indices, fresh):
        table[i] = b
    pool.release(old)
