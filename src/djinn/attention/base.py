"""The attention seam: what a batched forward tells attention, and what a backend must do.

A batch is *packed*: the new tokens of every sequence are laid end to end in one row
(``[total_new, ...]``, vLLM-style), sequence ``i`` owning rows ``query_start[i] ..
query_start[i+1]``. Each new token ``t`` sits at absolute position ``token_pos[t]`` of its
sequence ``token_seq[t]`` and attends to positions ``0 .. token_pos[t]`` of that sequence.
Because the batch cache writes every new token's K/V into the pool *before* attention runs,
all keys and values are read from the pool: one rule covers decode (one token), prefill
chunks (many) and mixed batches, and causality is just ``kv_len = token_pos + 1`` per token.

Invariants of ``AttentionMetadata`` (checked when it is built from host lists):
- ``block_tables[s, p]`` is the physical block holding positions ``p*bs .. p*bs+bs-1`` of
  sequence ``s``, for every ``p < ceil(kv_len / bs)``; later columns are never read;
- every ``kv_len >= 1``; padded rows of a captured graph use block ``BlockPool.NULL_BLOCK``
  with position 0, so they read one finite value and never another sequence's data;
- device tensors are derived from ``token_seq``/``token_pos``/``block_tables`` with device
  ops only (no host sync), so the derivation can be captured in a CUDA graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class SeqSpan:
    """Host-side view of one sequence of the batch."""

    start: int                 # tokens already cached before this forward
    new: int                   # tokens computed in this forward (>= 1)
    table: list[int]           # its block table (at least ceil((start + new) / bs) entries)

    @property
    def total(self) -> int:
        return self.start + self.new


@dataclass
class AttentionMetadata:
    block_size: int
    token_seq: torch.Tensor        # [T] int32: row of ``block_tables`` for each new token
    token_pos: torch.Tensor        # [T] int64: absolute position of each new token
    block_tables: torch.Tensor     # [S, W] int32
    kv_lens: torch.Tensor          # [T] int32: keys each token attends to (token_pos + 1)
    write_blocks: torch.Tensor     # [T] int64: block receiving the token's K/V
    write_offsets: torch.Tensor    # [T] int64: slot inside that block
    spans: list[SeqSpan] | None = None   # host copy; None inside a captured decode graph
    decode_only: bool = False            # every sequence has exactly one new token
    extra: dict = field(default_factory=dict)   # a backend's own per-step data

    @property
    def num_tokens(self) -> int:
        return self.token_seq.shape[0]


def derive(block_size: int, token_seq: torch.Tensor, token_pos: torch.Tensor, block_tables: torch.Tensor,
           spans: list[SeqSpan] | None = None, decode_only: bool = False) -> AttentionMetadata:
    """Metadata from the three source tensors, with device ops only (graph-capturable)."""
    page = torch.div(token_pos, block_size, rounding_mode="floor")
    write_blocks = block_tables[token_seq.long(), page].long()
    return AttentionMetadata(
        block_size=block_size, token_seq=token_seq, token_pos=token_pos, block_tables=block_tables,
        kv_lens=(token_pos + 1).to(torch.int32), write_blocks=write_blocks,
        write_offsets=token_pos - page * block_size, spans=spans, decode_only=decode_only,
    )


def build_metadata(spans: list[SeqSpan], block_size: int, device: torch.device) -> AttentionMetadata:
    """Metadata for an eager forward, from host-side spans (one host-to-device copy each)."""
    if not spans:
        raise ValueError("a batch needs at least one sequence")
    width = 1
    for s in spans:
        if s.new < 1 or s.start < 0:
            raise ValueError(f"each sequence needs >= 1 new token and start >= 0, got start={s.start} new={s.new}")
        need = -(-s.total // block_size)
        if len(s.table) < need:
            raise ValueError(f"block table holds {len(s.table) * block_size} tokens, the forward needs {s.total}")
        if 0 in s.table[:need]:
            raise ValueError("block 0 is the reserved null block; a sequence's table may not use it")
        width = max(width, need)
    # a multiple of 16 columns (padding points at the null block, never read past kv_lens): the
    # table's row stride is a kernel argument, and Triton compiles one variant per divisibility
    # class of it, so an unpadded width cost eager steps fresh compiles as contexts grew
    width = -(-width // 16) * 16
    seq, pos = [], []
    for i, s in enumerate(spans):
        seq.extend([i] * s.new)
        pos.extend(range(s.start, s.total))
    tables = torch.zeros(len(spans), width, dtype=torch.int32)
    for i, s in enumerate(spans):
        need = -(-s.total // block_size)
        tables[i, :need] = torch.tensor(s.table[:need], dtype=torch.int32)
    return derive(block_size, torch.tensor(seq, dtype=torch.int32, device=device),
                  torch.tensor(pos, dtype=torch.long, device=device), tables.to(device), spans=spans,
                  decode_only=all(s.new == 1 for s in spans))


class AttentionBackend(ABC):
    """Runs attention of one layer for a packed batch, reading K/V from the block pool."""

    name: str = "abstract"
    #: can run inside a captured CUDA graph (no host sync, no host-side data-dependent choice)
    graph_safe: bool = False

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Per-step work shared by all layers (index lists, split plans); default: none."""
        return meta

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """``q``: [T, H, D] (any strides, last dim contiguous or not); ``k_cache``/``v_cache``:
        one layer's pool views ``[num_blocks, block_size, kv_heads, D]``. Returns [T, H, D]."""
