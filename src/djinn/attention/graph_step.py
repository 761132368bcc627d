"""Attention of a captured batch step: fixed-size launches of the paged kernels.

A CUDA graph replays the launches it recorded, so inside one the attention of a step cannot
choose its kernels or grids from the step's mix of decode rows and prefill chunks. The step's
graph (``engine/graphs.py``) instead fills, before each replay, a fixed number of *decode
slots* (a query row, its table row, its number of keys) and *tiles* (up to
``PREFILL_BLOCK_M`` consecutive rows of one chunk) in static device buffers; this backend
launches the decode kernel over every slot and the prefill kernel over every tile. Spare
slots have 0 keys and spare tiles 0 rows: the kernels store nothing for them, and rows that no
slot or tile covers (the step's padding) come out as 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from djinn.attention.base import AttentionBackend, AttentionMetadata
from djinn.attention.triton_paged import decode_config, paged_decode, paged_prefill


@dataclass
class StaticStep:
    """Views of a graph's static buffers (all int32, on the device)."""

    rows: torch.Tensor        # [slots]: query row of each decode slot
    seqs: torch.Tensor        # [slots]: its row of the block tables
    kv_lens: torch.Tensor     # [slots]: keys it attends to (0: a spare slot)
    tiles: torch.Tensor       # [tiles, 4]: (table row, first query row, rows, first position)
    expected_rows: int        # real decode rows the launch is tuned for (a shape: fixed per graph)


class StaticStepBackend(AttentionBackend):
    """Reads ``meta.extra["static"]`` (a ``StaticStep``); graph-safe by construction."""

    name = "triton-paged-static"
    graph_safe = True

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        st: StaticStep = meta.extra["static"]
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        if st.rows.shape[0]:
            kv_heads = k_cache.shape[2]
            cfg = decode_config(st.expected_rows, kv_heads, q.shape[1] // kv_heads, q.shape[2], q.device)
            paged_decode(q, k_cache, v_cache, meta.block_tables, st.seqs, st.kv_lens, scale,
                         rows=st.rows, out=out, config=cfg)
        if st.tiles.shape[0]:
            paged_prefill(q, k_cache, v_cache, meta.block_tables, st.tiles, scale, out=out)
        return out
