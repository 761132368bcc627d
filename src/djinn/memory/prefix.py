"""Automatic prefix sharing: an index of full KV blocks by the content they hold.

A full block's KV is a function of the model's weights and the token ids from the start of
the session up to the end of that block, nothing else (causal attention; no interventions).
So two sessions whose token histories agree on their first ``k * block_size`` tokens hold
identical KV in their first ``k`` blocks, and may hold *one* copy of them (reference counts,
read-only, copy-on-write as for forks: ``memory.cow``).

The key of block ``j`` of a session is a hash chain (as in vLLM's and SGLang's prefix caches)::

    key(-1) = H(namespace)
    key(j)  = H(key(j - 1) || token ids of block j)

``namespace`` holds everything else the KV depends on or that must separate sharers: the
model, the session's owner (the server's principal: sessions of different API keys or tokens
never share) and a format version. ``H`` is BLAKE2b with a 128-bit digest: a collision is
as unlikely as a hardware fault, and a hit is only ever a block whose whole prefix matches.

``PrefixIndex`` (one per model's device pool) maps key -> block and block -> key.
Invariants (the residency keeps them, under its lock):
- an indexed block is held (reference count >= 1) and full, and its contents are exactly the
  KV of its key's tokens: a block is indexed only after the forward that wrote it finished and
  only for positions below ``num_cached``; it leaves the index when it is freed
  (``BlockPool.on_free``) and before anything writes into it (``Residency.grow``);
- only *clean* KV is indexed: positions computed with no intervention that changes K/V (a
  session's ``kv_clean_to``), so a steered session never hands its KV to an unsteered one;
- one block per key: a second session computing the same block keeps its own copy until its
  turn ends, then swaps it for the indexed one (``dedupe``), so concurrent sessions converge.
"""

from __future__ import annotations

import hashlib
from array import array

VERSION = b"djinn-prefix-1"
DIGEST = 16


def namespace(model: str, owner: str | None) -> bytes:
    """What besides the tokens separates blocks: the model and the owner (principal)."""
    parts = [VERSION, model.encode(), b"-" if owner is None else b"o:" + owner.encode()]
    return hashlib.blake2b(b"\x00".join(parts), digest_size=DIGEST).digest()


def chain(ns: bytes, tokens: list[int], block_size: int, blocks: int) -> list[bytes]:
    """Keys of the first ``blocks`` full blocks of ``tokens`` (fewer if ``tokens`` is shorter)."""
    out = []
    prev = ns
    blocks = min(blocks, len(tokens) // block_size)
    for j in range(blocks):
        ids = array("q", tokens[j * block_size:(j + 1) * block_size]).tobytes()
        prev = hashlib.blake2b(prev + ids, digest_size=DIGEST).digest()
        out.append(prev)
    return out


class PrefixIndex:
    """key -> block for the full, clean blocks of one device pool."""

    def __init__(self) -> None:
        self._by_key: dict[bytes, int] = {}
        self._of_block: dict[int, bytes] = {}
        self.hits = 0            # blocks a session took from the index instead of computing/copying them
        self.deduped = 0         # private duplicates swapped for the indexed block at a turn's end

    def __len__(self) -> int:
        return len(self._by_key)

    def lookup(self, key: bytes) -> int | None:
        return self._by_key.get(key)

    def key_of(self, block: int) -> bytes | None:
        return self._of_block.get(block)

    def add(self, key: bytes, block: int) -> int:
        """Index ``block`` under ``key`` unless another block holds that key; returns the block
        that holds it now."""
        held = self._by_key.get(key)
        if held is not None:
            return held
        old = self._of_block.get(block)
        if old is not None and old != key:   # pragma: no cover - a block holds one content
            raise RuntimeError(f"block {block} is indexed under another key")
        self._by_key[key] = block
        self._of_block[block] = key
        return block

    def forget(self, block: int) -> None:
        """``block`` is freed or about to be written: it no longer holds its key's KV."""
        key = self._of_block.pop(block, None)
        if key is not None and self._by_key.get(key) == block:
            del self._by_key[key]

    def forget_many(self, blocks) -> None:
        for b in blocks:
            self.forget(b)
