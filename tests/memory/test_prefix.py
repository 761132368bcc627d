"""The prefix index (memory/prefix.py) and the session-level sharing steps (engine/sharing.py),
on a real BlockPool with fake sessions: no model involved."""

from __future__ import annotations

import torch

from djinn.engine import sharing
from djinn.engine.session import Session
from djinn.memory.blocks import BlockPool, KVShape
from djinn.memory.prefix import PrefixIndex, chain, namespace

BS = 4


def pool_with_index(blocks: int = 32) -> tuple[BlockPool, PrefixIndex]:
    pool = BlockPool(KVShape(num_layers=2, kv_heads=1, head_dim=2, block_size=BS, dtype=torch.float32), blocks, "cpu")
    index = PrefixIndex()
    pool.on_free = index.forget
    return pool, index


def computed(pool: BlockPool, tokens: list[int], owner: str | None = None, model: str = "m") -> Session:
    """A session whose KV of all but its last token is computed (as between turns)."""
    s = Session(model=model, owner=owner, tokens=list(tokens))
    s.num_cached = len(tokens) - 1
    s.block_table = pool.allocate(pool.shape.blocks_for(s.num_cached))
    return s


def test_chain_depends_on_the_whole_prefix_and_the_namespace():
    ns = namespace("m", None)
    a = chain(ns, list(range(12)), BS, 10)
    assert len(a) == 3                                      # only full blocks
    assert a == chain(ns, list(range(12)) + [99, 98], BS, 3)   # later tokens do not matter
    b = chain(ns, [7] + list(range(1, 12)), BS, 3)
    assert all(x != y for x, y in zip(a, b))                # a change in block 0 changes every later key
    c = chain(ns, list(range(8)) + [0, 9, 10, 11], BS, 3)
    assert c[:2] == a[:2] and c[2] != a[2]
    for other in (namespace("m", "alice"), namespace("m2", None), namespace("m", "")):
        assert set(chain(other, list(range(12)), BS, 3)).isdisjoint(a)


def test_index_keeps_one_block_per_key_and_forgets_freed_blocks():
    pool, index = pool_with_index()
    b1, b2 = pool.allocate(2)
    assert index.add(b"k", b1) == b1
    assert index.add(b"k", b2) == b1            # the key is held: the second block is not indexed
    assert index.key_of(b2) is None and index.lookup(b"k") == b1
    index.forget(b2)                            # forgetting an unindexed block changes nothing
    assert index.lookup(b"k") == b1
    pool.share([b1])
    pool.release([b1])
    assert index.lookup(b"k") == b1             # still held by one reference
    pool.release([b1])
    assert index.lookup(b"k") is None and len(index) == 0   # freed: gone


def test_take_shares_full_blocks_up_to_the_first_miss_and_frees_the_reserved_ones():
    pool, index = pool_with_index()
    a = computed(pool, list(range(14)))          # 13 cached: 3 full blocks
    sharing.publish(pool, index, a)
    assert len(index) == 3
    b = Session(model="m", tokens=list(range(8)) + [50, 51, 52, 53, 54, 55])
    b.block_table = pool.allocate(pool.shape.blocks_for(len(b.tokens)))
    used = pool.used_count
    skipped = sharing.take(pool, index, b, len(b.tokens) - 1)
    assert skipped == 2 * BS and b.num_cached == 8          # block 2 differs: stop there
    assert b.block_table[:2] == a.block_table[:2] and pool.refcount(a.block_table[0]) == 2
    assert pool.used_count == used - 2                       # the two reserved blocks were freed
    assert sharing.take(pool, index, b, len(b.tokens) - 1) == 0   # nothing more to take


def test_take_leaves_the_last_token_and_unaligned_starts_alone():
    pool, index = pool_with_index()
    a = computed(pool, list(range(13)))          # 12 cached: 3 full blocks
    sharing.publish(pool, index, a)
    b = Session(model="m", tokens=list(range(12)))
    b.block_table = pool.allocate(3)
    assert sharing.take(pool, index, b, len(b.tokens) - 1) == 2 * BS   # block 2 holds the token to compute
    c = Session(model="m", tokens=list(range(12)), num_cached=1)
    c.block_table = pool.allocate(3)
    assert sharing.take(pool, index, c, 11) == 0             # its first block is partly computed


def test_owners_and_taint_separate_sessions():
    pool, index = pool_with_index()
    a = computed(pool, list(range(13)), owner="alice")
    sharing.publish(pool, index, a)
    for owner in ("bob", None):
        b = Session(model="m", owner=owner, tokens=list(range(13)))
        b.block_table = pool.allocate(4)
        assert sharing.take(pool, index, b, 12) == 0
    steered = computed(pool, list(range(13)))
    steered.kv_clean_to = 4                      # computed with an intervention from position 4 on
    sharing.publish(pool, index, steered)
    assert index.key_of(steered.block_table[0]) is not None
    assert all(index.key_of(b) is None for b in steered.block_table[1:])
    plain = Session(model="m", tokens=list(range(13)))
    plain.block_table = pool.allocate(4)
    assert sharing.take(pool, index, plain, 12) == BS      # only the clean block


def test_publish_dedupes_a_concurrently_computed_copy_and_memory_returns():
    pool, index = pool_with_index()
    a, b = computed(pool, list(range(13))), computed(pool, list(range(13)))
    sharing.publish(pool, index, a)
    epoch = b.kv_epoch
    assert sharing.publish(pool, index, b) == 3
    assert b.block_table == a.block_table and b.kv_epoch == epoch + 1
    assert pool.used_count == 3 and pool.shared_count == 3 and pool.logical_count == 6
    pool.release(a.block_table)
    pool.release(b.block_table)
    assert pool.used_count == 0 and len(index) == 0


def test_reshare_finds_live_blocks_anywhere_in_the_chain():
    pool, index = pool_with_index()
    a = computed(pool, list(range(13)))
    sharing.publish(pool, index, a)
    index.forget(a.block_table[1])
    parked = Session(model="m", tokens=list(range(13)), num_cached=12)
    found = sharing.reshare(pool, index, parked, 3, BS)
    assert found == {0: a.block_table[0], 2: a.block_table[2]}
    assert pool.refcount(a.block_table[0]) == 2 and pool.refcount(a.block_table[1]) == 1
