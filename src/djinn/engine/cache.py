"""Djinn's KV cache as a transformers ``Cache``: storage comes from the block pool.

transformers' attention modules call ``past_key_values.update(k, v, layer_idx)`` with the new
tokens' K/V and expect the whole context's K/V back. ``PagedCache`` writes the new K/V into the
session's blocks (through its block table) and returns the context gathered from the blocks
(the CPU reference path; DESIGN.md "Attention reads blocks in place" for the GPU kernel).
This is the seam that lets every transformers causal LM run on Djinn's memory unchanged.

One ``PagedCache`` lives for one forward of one session: ``start`` tokens are already cached,
``new`` tokens are being computed. During the forward ``get_seq_length`` stays ``start`` so
masks and positions computed before layer 0 are right, whatever layers already ran.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from djinn.attention.hf import PoolLayer
from djinn.memory.blocks import BlockPool


class PagedCache(Cache):
    """The KV of one session's forward, stored in ``pool`` blocks listed by ``block_table``."""

    def __init__(self, pool: BlockPool, block_table: list[int], start: int, new: int):
        self.pool = pool
        self.start = start
        self.new = new
        self._table, self._write_blocks, self._write_offsets = self._indices(block_table)
        super().__init__(layers=[PoolLayer(self, i) for i in range(pool.shape.num_layers)])

    def _indices(self, block_table: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bs = self.pool.shape.block_size
        total = self.start + self.new
        if len(block_table) * bs < total:
            raise RuntimeError(f"block table holds {len(block_table) * bs} tokens, forward needs {total}")
        device = self.pool.device
        self._bound = list(block_table[: -(-total // bs)])
        table = torch.tensor(self._bound, dtype=torch.long, device=device)
        pos = torch.arange(self.start, total, device=device)
        return table, table[pos // bs], pos % bs

    def rebind(self, block_table: list[int]) -> None:
        """Point this cache at ``block_table`` again, after the session's blocks moved (parked
        while paused at a breakpoint and restored into other physical blocks).

        The cache object stays the same (a paused forward's captured layer arguments refer to
        it) and its index tensors are overwritten in place, so anything holding them sees the
        new blocks. The block contents must already be where the new table says."""
        if list(block_table[: len(self._bound)]) == self._bound:
            return   # nothing moved: no copy to the device
        table, blocks, offsets = self._indices(block_table)
        self._table.copy_(table)
        self._write_blocks.copy_(blocks)
        self._write_offsets.copy_(offsets)

    @property
    def past(self) -> int:
        return self.start

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Store the new tokens' K/V of ``layer``; return the context's K/V as [1, H, T, D]."""
        if key_states.shape[0] != 1 or key_states.shape[-2] != self.new:
            raise RuntimeError(f"paged cache expects [1, H, {self.new}, D], got {tuple(key_states.shape)}")
        total = self.start + self.new
        out = []
        for kv, states in ((0, key_states), (1, value_states)):
            view = self.pool.layer_view(layer, kv)  # [NB, bs, H, D]
            view[self._write_blocks, self._write_offsets] = states[0].transpose(0, 1).to(view.dtype)
            ctx = view[self._table].flatten(0, 1)[:total]  # [T, H, D]
            out.append(ctx.transpose(0, 1).unsqueeze(0))
        return out[0], out[1]
