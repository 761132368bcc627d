"""The KV block pool: one tensor allocated once, handed out in blocks.

A block holds K and V of ``block_size`` consecutive tokens for *every* layer, so the pool is
shaped ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]`` (DESIGN.md, "A block holds
all layers"). Moving a session between tiers is then one contiguous copy per block, several MB
each for real models, instead of one small copy per layer.

Invariants:
- block 0 is the reserved null block: never handed out, never written by a session (padded
  rows of a batch may point at it);
- every other block is either free or held, with a reference count >= 1 while held;
- a block with reference count > 1 is shared (a fork) and is never written: a session about
  to write into one first takes a private copy (``memory.cow``);
- free blocks are handed out as one run of consecutive ids when one is long enough
  (``memory.freelist``: a move copies runs), and deterministically.

The pool only accounts; deciding who gets memory is the scheduler's job and moving bytes is
the pager's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from djinn.errors import CapacityError
from djinn.memory.freelist import FreeBlocks


@dataclass(frozen=True)
class KVShape:
    """Geometry of one model's KV cache."""

    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.kv_heads * self.head_dim * itemsize

    @property
    def token_bytes(self) -> int:
        return self.block_bytes // self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


class BlockPool:
    """Fixed-size pool of KV blocks on one device (parked KV lives in ``memory.host.HostArena``)."""

    NULL_BLOCK = 0

    def __init__(self, shape: KVShape, num_blocks: int, device: torch.device, pin_memory: bool = False):
        if num_blocks < 2:
            raise CapacityError(
                f"KV budget too small: {num_blocks} block(s) of {shape.block_bytes / 2**20:.2f} MiB; "
                "raise --gpu-memory/--host-memory or lower the block size"
            )
        self.shape = shape
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        dims = (num_blocks, shape.num_layers, 2, shape.block_size, shape.kv_heads, shape.head_dim)
        self.kv = torch.zeros(dims, dtype=shape.dtype, device=self.device, pin_memory=pin_memory)
        self._free = FreeBlocks(num_blocks)
        self._free.add_range(1, num_blocks - 1)
        self._refs = [0] * num_blocks
        self._shared = 0               # blocks held by more than one reference (forks)
        self._refsum = 0               # references in all: the blocks sessions would hold unshared
        self.high_water = 0            # the most blocks ever held at once (checked by the memory tests)
        self.on_free = None            # called with each block whose last reference is dropped (memory.prefix)

    # ---- accounting -------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (the null block excluded)."""
        return self.num_blocks - 1

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.capacity - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_count * self.shape.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.shape.block_bytes

    def refcount(self, block: int) -> int:
        return self._refs[block]

    @property
    def shared_count(self) -> int:
        """Blocks held by more than one session (each counted once in ``used_count``)."""
        return self._shared

    @property
    def logical_count(self) -> int:
        """Blocks the holders would need without sharing (the sum of reference counts)."""
        return self._refsum

    # ---- allocation -------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks or none (all-or-nothing); raises CapacityError if short."""
        if n > len(self._free):
            raise CapacityError(
                f"KV pool on {self.device} is full: need {n} block(s), {len(self._free)} free of {self.capacity}"
            )
        out = self._free.take(n)
        for b in out:
            self._refs[b] = 1
        self._refsum += n
        self.high_water = max(self.high_water, self.used_count)
        return out

    def share(self, blocks: list[int]) -> None:
        """Add one reference to each block (a fork shares them)."""
        for b in blocks:
            if self._refs[b] < 1:
                raise RuntimeError(f"sharing block {b} that is not held")
            self._refs[b] += 1
            self._refsum += 1
            if self._refs[b] == 2:
                self._shared += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        for b in blocks:
            if b == self.NULL_BLOCK or self._refs[b] < 1:
                raise RuntimeError(f"releasing block {b} that is not held")
            self._refs[b] -= 1
            self._refsum -= 1
            if self._refs[b] == 1:
                self._shared -= 1
            elif self._refs[b] == 0:
                self._free.add(b)
                if self.on_free is not None:
                    self.on_free(b)

    # ---- views ------------------------------------------------------------------------
    def run_view(self, first: int, n: int) -> torch.Tensor:
        """``[n, layers, 2, block_size, kv_heads, head_dim]`` view of blocks ``first .. first+n-1``."""
        return self.kv[first:first + n]

    def layer_view(self, layer: int, kv: int) -> torch.Tensor:
        """``[num_blocks, block_size, kv_heads, head_dim]`` view of K (kv=0) or V (kv=1)."""
        return self.kv[:, layer, kv]
