"""Many sessions in one forward: a packed, ragged batch over the block pool.

Each ``BatchItem`` is one session's share of a step: its block table, how many tokens it has
cached (``start``), the tokens it adds (one for a decode, many for a prefill chunk), an
optional per-layer hook and whether it wants logits for every new token. All new tokens are
laid end to end in one row ``[1, T, hidden]`` with their own position ids, so the model's own
embeddings and rotary/learned positions are right per sequence; attention keeps sequences
apart through ``djinn.attention`` (no transformers mask is built).

Like the single-session executor, a batch runs in three parts that a caller may interleave
with other work: ``begin_batch`` (the model's code up to decoder layer 0),
``run_batch_layers`` (layers as units; an item's hook sees and rewrites only that item's rows)
and ``finish_batch`` (final norm + LM head on the rows that need logits). ``split_batch``
takes items out of a paused batch (a breakpoint) as batches of their own.

Invariants: item ``i`` owns rows ``rows[i] = (a, b)`` of the hidden state, in item order;
when ``run_batch_layers`` returns, every layer below ``next_layer`` has written every item's
new K/V into its blocks; nothing here changes a block table or the pool's accounting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from djinn.attention import AttentionBackend, AttentionMetadata, SeqSpan, backend_for, build_metadata
from djinn.attention.hf import BatchAttention, BatchCache, use_djinn_attention
from djinn.engine import fused
from djinn.memory.blocks import BlockPool

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class BatchItem:
    block_table: list[int]
    start: int                        # tokens of this session already in its blocks
    tokens: list[int]                 # token ids computed in this step (>= 1)
    hook: LayerHook | None = None     # hook(layer, rows [1, n, hidden]) -> rows, after each layer
    all_logits: bool = False          # logits of every new token, else of the last one only


@dataclass
class BatchState:
    items: list[BatchItem]
    pool: BlockPool
    backend: AttentionBackend
    meta: AttentionMetadata
    hidden: torch.Tensor              # [1, T, hidden] after layer ``next_layer - 1``
    next_layer: int
    layer_args: tuple
    layer_kwargs: dict
    rows: list[tuple[int, int]] = field(default_factory=list)


@contextlib.contextmanager
def batched_mode(executor, device: torch.device) -> Iterator[None]:
    """The model's batched personality: Djinn attention, and fused norm/rotary kernels on CUDA."""
    with use_djinn_attention(executor.model), fused.fused_ops(executor.model, fused.available(device)):
        yield


def _rows(items: list[BatchItem]) -> list[tuple[int, int]]:
    out, a = [], 0
    for it in items:
        out.append((a, a + len(it.tokens)))
        a += len(it.tokens)
    return out


def begin_batch(executor, pool: BlockPool, items: list[BatchItem], backend: AttentionBackend | None = None
                ) -> BatchState:
    """Embeddings and positions of all items' new tokens: the state before decoder layer 0."""
    if not items:
        raise ValueError("an empty batch")
    backend = backend or backend_for(pool.device)
    spans = [SeqSpan(it.start, len(it.tokens), it.block_table) for it in items]
    meta = backend.prepare(build_metadata(spans, pool.shape.block_size, pool.device))
    ids = torch.tensor([[t for it in items for t in it.tokens]], dtype=torch.long, device=pool.device)
    hidden, args, kwargs = _enter(executor, pool, backend, meta, ids)
    return BatchState(items=list(items), pool=pool, backend=backend, meta=meta, hidden=hidden, next_layer=0,
                      layer_args=args, layer_kwargs=kwargs, rows=_rows(items))


def _enter(executor, pool: BlockPool, backend: AttentionBackend, meta: AttentionMetadata, ids: torch.Tensor):
    """The model's code before layer 0 for packed ``ids`` [1, T] (graph-capturable)."""
    with batched_mode(executor, pool.device):
        return executor.enter_layers(
            input_ids=ids, position_ids=meta.token_pos[None],
            # a dummy 2-D mask: "djinn" builds no mask from it, and it keeps models from probing
            # input_ids for padding (a host sync that a CUDA graph capture cannot contain)
            attention_mask=torch.ones_like(ids),
            past_key_values=BatchCache(pool, meta), use_cache=True,
            djinn_batch=BatchAttention(meta, backend),
        )


def run_batch_layers(executor, st: BatchState, until: int | None = None) -> BatchState:
    """Decoder layers ``st.next_layer .. until`` (inclusive; None = all), per-item hooks after each."""
    last = executor.num_layers - 1 if until is None else until
    h = st.hidden
    hooked = [(it.hook, a, b) for it, (a, b) in zip(st.items, st.rows) if it.hook is not None]
    with batched_mode(executor, st.pool.device):
        for i in range(st.next_layer, last + 1):
            out = executor.arch.layers[i](h, *st.layer_args, **st.layer_kwargs)
            h = out[0] if isinstance(out, tuple) else out
            if hooked:
                h = _apply_hooks(i, h, st.rows, hooked)
    st.hidden = h
    st.next_layer = last + 1
    return st


def _apply_hooks(layer: int, h: torch.Tensor, rows, hooked) -> torch.Tensor:
    parts, a0 = [], 0
    for hook, a, b in hooked:
        if a > a0:
            parts.append(h[:, a0:a])
        seg = hook(layer, h[:, a:b])
        if not isinstance(seg, torch.Tensor) or seg.shape != (1, b - a, h.shape[-1]):
            raise RuntimeError(f"a layer hook must return a tensor shaped {(1, b - a, h.shape[-1])}")
        parts.append(seg.to(h.dtype))
        a0 = b
    if a0 < h.shape[1]:
        parts.append(h[:, a0:])
    return torch.cat(parts, dim=1)


def finish_batch(executor, st: BatchState) -> list[torch.Tensor]:
    """Final norm + LM head. Per item: float logits [n, vocab] if ``all_logits`` else [1, vocab]."""
    if st.next_layer != executor.num_layers:
        raise RuntimeError(f"finish_batch() before all layers ran (next layer {st.next_layer})")
    idx, counts = [], []
    for it, (a, b) in zip(st.items, st.rows):
        take = range(a, b) if it.all_logits else range(b - 1, b)
        idx.extend(take)
        counts.append(len(take))
    h = st.hidden[0].index_select(0, torch.tensor(idx, dtype=torch.long, device=st.hidden.device))[None]
    if executor.arch.final_norm is not None:
        with fused.fused_ops(executor.model, fused.available(st.pool.device)):
            h = executor.arch.final_norm(h)
    logits = executor.arch.lm_head(h)[0].float()
    return list(torch.split(logits, counts))


def split_batch(executor, st: BatchState, indices: list[int]) -> tuple[BatchState, BatchState | None]:
    """Take items ``indices`` out of a paused batch: (their batch, the rest or None), both at
    ``st.next_layer`` with their own rows of the hidden state. Layer arguments (positions,
    rotary) are rebuilt by the model's own code for each part; no K/V is written twice."""
    chosen = sorted(set(indices))
    if not chosen or chosen[0] < 0 or chosen[-1] >= len(st.items):
        raise ValueError(f"indices must name items of the batch (0..{len(st.items) - 1})")
    rest = [i for i in range(len(st.items)) if i not in chosen]

    def part(which: list[int]) -> BatchState:
        sub = begin_batch(executor, st.pool, [st.items[i] for i in which], st.backend)
        rows = torch.cat([torch.arange(*st.rows[i], device=st.hidden.device) for i in which])
        sub.hidden = st.hidden.index_select(1, rows)
        sub.next_layer = st.next_layer
        return sub

    return part(chosen), (part(rest) if rest else None)


def forward_batch(executor, pool: BlockPool, items: list[BatchItem], backend: AttentionBackend | None = None,
                  graphs=None) -> list[torch.Tensor]:
    """A whole batched forward; a step without hooks replays a captured graph if one fits."""
    with torch.inference_mode():
        if graphs is not None and graphs.accepts(items):
            return graphs.run(items)
        st = begin_batch(executor, pool, items, backend)
        run_batch_layers(executor, st)
        return finish_batch(executor, st)
