"""The seam to transformers for batched forwards: an attention function and a batch cache.

transformers' attention modules compute q/k/v and rotary themselves, call
``past_key_values.update(k, v, layer)`` and hand the result to the attention function named
by ``config._attn_implementation``; extra keyword arguments of the model's forward reach that
function. Djinn plugs in at exactly those points, so every transformers causal LM runs a
packed, ragged batch on the block pool without its code being rewritten:

- ``BatchCache.update`` writes the new tokens' K/V into their blocks (one scatter per layer
  and K/V) and returns the layer's *pool views*, not a gathered context;
- ``djinn_attention_forward`` (registered as ``"djinn"``) gets those views plus the batch's
  ``AttentionMetadata`` through the ``djinn_batch`` keyword and runs the chosen backend;
- ``"djinn"`` has no mask function, so transformers builds no mask (``create_causal_mask``
  returns None for such implementations); causality and sequence separation come from each
  token's ``kv_len`` and block table.

``use_djinn_attention(model)`` switches the model to ``"djinn"`` only for the duration of a
batched call and restores what was there: single-session forwards and transformers' own
``generate`` on the same model keep using its own attention. The switch is not thread-safe,
which matches the engine's rule that one loop thread runs every forward of a model.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from djinn.attention.base import AttentionBackend, AttentionMetadata
from djinn.errors import UnsupportedModel
from djinn.memory.blocks import BlockPool

IMPLEMENTATION = "djinn"


@dataclass
class BatchAttention:
    """What the attention function needs for one step; passed as ``djinn_batch=``."""

    meta: AttentionMetadata
    backend: AttentionBackend


def djinn_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            djinn_batch: BatchAttention | None = None, **kwargs):
    """``query`` [1, H, T, D]; ``key``/``value``: pool views from ``BatchCache``. -> ([1, T, H, D], None)."""
    if djinn_batch is None:
        raise RuntimeError("djinn attention ran outside a Djinn batch (no djinn_batch keyword)")
    if kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise UnsupportedModel("batched attention supports full causal attention only "
                               "(no sliding window, soft-capping or attention sinks yet)")
    if query.shape[0] != 1:
        raise RuntimeError(f"a packed batch has one row, got query {tuple(query.shape)}")
    q = query[0].transpose(0, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = djinn_batch.backend.attend(q, key, value, djinn_batch.meta, scale)
    return out.unsqueeze(0), None


AttentionInterface.register(IMPLEMENTATION, djinn_attention_forward)


class PoolLayer(CacheLayerMixin):
    """One layer's face of a cache whose storage is the block pool. ``owner`` provides
    ``write(layer, k, v) -> (k, v)``, ``past`` (tokens cached before this forward) and
    ``masked`` (whether transformers should build a mask of past + new keys)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, owner, layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # storage is the pool
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.write(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.past + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.past

    def get_max_length(self) -> int:
        return -1


class BatchCache(Cache):
    """The KV of one packed batch: writes new K/V to the pool, hands out per-layer pool views."""

    def __init__(self, pool: BlockPool, meta: AttentionMetadata):
        self.pool = pool
        self.meta = meta
        super().__init__(layers=[PoolLayer(self, i) for i in range(pool.shape.num_layers)])

    past = 0   # the "djinn" attention builds no transformers mask: positions travel in ``meta``

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Store ``[1, kv_heads, T, D]`` new K/V of ``layer``; return the layer's K and V pool views."""
        if key_states.shape[0] != 1 or key_states.shape[2] != self.meta.num_tokens:
            raise RuntimeError(f"batch cache expects [1, H, {self.meta.num_tokens}, D], got {tuple(key_states.shape)}")
        views = []
        for kv, states in ((0, key_states), (1, value_states)):
            view = self.pool.layer_view(layer, kv)  # [NB, bs, H, D], strided
            view[self.meta.write_blocks, self.meta.write_offsets] = states[0].transpose(0, 1).to(view.dtype)
            views.append(view)
        return views[0], views[1]


_CONFIGS: "weakref.WeakKeyDictionary[torch.nn.Module, list[PretrainedConfig]]" = weakref.WeakKeyDictionary()


def _configs(model: torch.nn.Module) -> list[PretrainedConfig]:
    found = _CONFIGS.get(model)
    if found is None:
        seen: dict[int, PretrainedConfig] = {}
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if isinstance(cfg, PretrainedConfig):
                seen.setdefault(id(cfg), cfg)
        found = _CONFIGS[model] = list(seen.values())
    return found


@contextlib.contextmanager
def use_djinn_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's attention to ``"djinn"`` for the block; restore the previous choice."""
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = IMPLEMENTATION
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b
