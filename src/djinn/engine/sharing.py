"""Automatic prefix sharing between sessions: what a session takes from and gives to the
``memory.prefix.PrefixIndex`` of its model's device pool.

The residency calls these under its lock, at three points:

- ``take`` before a forward computes ``tokens[num_cached:end]`` (a turn's prompt, or the
  recompute of a dropped session's prefix): the full blocks of that range whose key is indexed
  replace the session's freshly reserved blocks (one more reference each, the reserved block is
  freed) and ``num_cached`` advances past them, so the forward skips those tokens, exactly as
  a fork's child skips its parent's history;
- ``publish`` when a turn ended (and when a restore landed): the session's full, clean,
  computed blocks enter the index; a block whose key another block already holds is swapped for
  that one (``dedupe``), so sessions that computed the same prefix at the same time converge
  to one copy;
- ``reshare`` when a session is restored (parked): the blocks whose key is live on the device
  (in the host arena) are shared instead of copied, so a common prefix moves once for all its
  owners; ``publish_table`` indexes the blocks a finished copy filled.

A block is *clean* when no intervention that changes K/V touched it: ``Session.kv_clean_to``
is the first position computed otherwise (``taint``). A white-box turn (interventions,
captures or a breakpoint) never takes shared blocks: it must compute its tokens itself.
"""

from __future__ import annotations

from djinn.engine.session import Session
from djinn.memory.blocks import BlockPool
from djinn.memory.prefix import PrefixIndex, chain, namespace


def changes_kv(plan, num_layers: int) -> bool:
    """Does a white-box request (``(LayerPlan, breakpoint)`` as ``WhiteBox.plan`` returns it, or
    a ``LayerPlan`` and a breakpoint) change the K/V its forward writes? An intervention before
    the last layer does (the next layer's K/V read the edited hidden state); so may any
    breakpoint (its resume may replace the activation)."""
    if plan is None:
        return False
    layer_plan, bp = plan
    return bp is not None or any(x.layer < num_layers - 1 for x in layer_plan.items)


def taint(s: Session) -> None:
    """The next forward of ``s`` (from ``num_cached`` on) computes K/V that are not the plain
    model's: those positions, and every later one (they attend to them), are never shared."""
    s.kv_clean_to = min(s.kv_clean_to, s.num_cached)


def _keys(s: Session, block_size: int, blocks: int) -> list[bytes]:
    return chain(namespace(s.model, s.owner), s.tokens, block_size, blocks)


def take(pool: BlockPool, index: PrefixIndex, s: Session, end: int) -> int:
    """Share indexed blocks for the full blocks of ``tokens[num_cached:end]``, in order, up to
    the first miss: a block the table already reserves for that position is replaced (and freed:
    it was never written), past the table's end the shared block is appended, so a turn that
    reserves its blocks after this needs room only for what it computes. Returns the tokens
    skipped (``num_cached`` advanced by that much)."""
    bs = pool.shape.block_size
    if s.num_cached % bs or len(s.block_table) < s.num_cached // bs:
        return 0      # a partly filled block comes first: this forward must write into it
    first = s.num_cached // bs
    last = min(end, s.kv_clean_to, len(s.tokens)) // bs
    if last <= first:
        return 0
    keys = _keys(s, bs, last)
    taken = 0
    for j in range(first, last):
        b = index.lookup(keys[j])
        if b is None:
            break
        pool.share([b])
        if j == len(s.block_table):
            s.block_table.append(b)
        else:
            old, s.block_table[j] = s.block_table[j], b
            pool.release([old])      # the block reserved for computing it, never written
        taken += 1
    if taken:
        s.num_cached += taken * bs
        s.kv_epoch += 1
        index.hits += taken
    return taken * bs


def publish(pool: BlockPool, index: PrefixIndex, s: Session, dedupe: bool = True) -> int:
    """Index ``s``'s full, clean, computed blocks. With ``dedupe``, a block whose key another
    block holds is replaced by that block (the session must not be inside a forward). Returns
    the blocks swapped."""
    bs = pool.shape.block_size
    n = min(min(s.num_cached, s.kv_clean_to) // bs, len(s.block_table))
    if n <= 0:
        return 0
    swapped = 0
    for j, key in enumerate(_keys(s, bs, n)):
        b = s.block_table[j]
        held = index.lookup(key)
        if held is None:
            index.add(key, b)
        elif held != b and dedupe:
            pool.share([held])
            s.block_table[j] = held
            pool.release([b])
            swapped += 1
    if swapped:
        s.kv_epoch += 1
        index.deduped += swapped
    return swapped


def reshare(owner, index: PrefixIndex, s: Session, blocks: int, block_size: int) -> dict[int, int]:
    """For a move of ``s``'s first ``blocks`` blocks into ``owner`` (the device pool for a restore,
    the host arena for a park): ``{j: block}`` for each clean full block whose key ``index``
    (``owner``'s) holds, each with one more reference taken for ``s``: those need no copy."""
    n = min(min(s.num_cached, s.kv_clean_to) // block_size, blocks)
    found = {}
    for j, key in enumerate(_keys(s, block_size, n)):
        b = index.lookup(key)
        if b is not None:
            owner.share([b])
            found[j] = b
    index.hits += len(found)
    return found


def live_count(index: PrefixIndex, s: Session, blocks: int, block_size: int) -> int:
    """How many of ``s``'s first ``blocks`` blocks ``reshare`` would find in ``index`` now."""
    n = min(min(s.num_cached, s.kv_clean_to) // block_size, blocks)
    return sum(1 for key in _keys(s, block_size, n) if index.lookup(key) is not None)


def publish_table(index: PrefixIndex, s: Session, table: list[int], block_size: int) -> None:
    """Index the clean full blocks of ``table`` (``s``'s blocks in some tier, all copies into
    them complete) under their keys, where no other block holds the key."""
    n = min(min(s.num_cached, s.kv_clean_to) // block_size, len(table))
    for j, key in enumerate(_keys(s, block_size, n)):
        if index.lookup(key) is None:
            index.add(key, table[j])
