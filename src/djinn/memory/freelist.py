"""The free blocks of a pool or an arena, handed out in runs of consecutive ids.

A session's KV moves between the tiers as copies of runs of blocks that are consecutive on
both sides (``memory.pager.runs``); each run costs the thread that issues it a call into the
driver (~10-30 us with torch's dispatch). Handed out first-in first-out, blocks freed by
different sessions interleave after a few minutes of churn, and a 70-block session took 60 copy
calls per park on the dense agents preset (agents-dense-cuda-20261126T062751.json,
``copy_calls``). Here an allocation takes the first run of free ids long enough for all of it,
else the lowest free ids, so a restored session is one run on the device whenever any run of
its length is free.

A bytearray (one byte per block, 1 = free) keeps the search in C (``bytearray.find``); written
here because no library keeps a free list of integer ids by runs (Djinn's pool is its own).
"""

from __future__ import annotations


class FreeBlocks:
    """Free block ids in ``[0, size)``; ``take`` prefers one run of consecutive ids."""

    def __init__(self, size: int = 0):
        self._bits = bytearray(size)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def grow(self, size: int) -> None:
        """Room for ids up to ``size - 1`` (none of the new ones free)."""
        if size > len(self._bits):
            self._bits.extend(bytes(size - len(self._bits)))

    def add(self, block: int) -> None:
        if self._bits[block]:
            raise RuntimeError(f"block {block} is already free")
        self._bits[block] = 1
        self._count += 1

    def add_range(self, first: int, n: int) -> None:
        if any(self._bits[first:first + n]):
            raise RuntimeError(f"blocks {first}..{first + n - 1} are already partly free")
        self._bits[first:first + n] = b"\x01" * n
        self._count += n

    def take(self, n: int) -> list[int]:
        """``n`` free ids (the caller checked ``len(self) >= n``): the first run of ``n``
        consecutive ones if there is one, else the lowest ``n``."""
        if n <= 0:
            return []
        at = self._bits.find(b"\x01" * n)
        if at >= 0:
            out = list(range(at, at + n))
        else:
            out, at = [], 0
            while len(out) < n:
                at = self._bits.find(1, at)
                out.append(at)
                at += 1
        for b in out:
            self._bits[b] = 0
        self._count -= n
        return out
