"""Runs forward passes layer by layer over a session's paged KV.

A forward is split in three so it can stop between any two decoder layers:
``begin`` runs the model's own code up to the first decoder layer (embeddings, position
embeddings, masks) and captures the arguments that code passes to the layers; ``run_layers``
runs decoder layers as units, calling an optional per-layer hook (interventions, captures);
``finish`` applies the final norm and the LM head. A ``ForwardState`` between calls is all a
paused forward needs; it holds no global state, so several forwards can be in flight.

``layer_source`` (optional) is told before and after each decoder layer runs: a weight
streamer (djinn.memory.streaming) uses it to bring the layer's weights onto the device. It is
the only way the executor knows a model is streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from djinn.engine.cache import PagedCache
from djinn.models.adapter import Architecture

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


class LayerSource(Protocol):
    """Where decoder layers' weights come from: called around every decoder layer."""

    def before_layer(self, layer: int) -> None: ...

    def after_layer(self, layer: int) -> None: ...


class _Captured(Exception):
    """Raised from the first decoder layer's pre-hook to stop the model's own forward there."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs


@dataclass
class ForwardState:
    cache: PagedCache
    hidden: torch.Tensor          # [1, q, hidden] after layer ``next_layer - 1``
    next_layer: int               # the first decoder layer still to run
    layer_args: tuple             # positional args after the hidden state, as the model passes them
    layer_kwargs: dict

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]


class Executor:
    """Executes forwards of one model. Stateless apart from the model it runs."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, layer_source: LayerSource | None = None):
        self.model = model
        self.arch = arch
        self.layer_source = layer_source

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    def begin(self, cache: PagedCache, input_ids: torch.Tensor) -> ForwardState:
        """Run embeddings/positions/masks and return the state before decoder layer 0."""
        hidden, rest, kwargs = self.enter_layers(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return ForwardState(cache=cache, hidden=hidden, next_layer=0, layer_args=rest, layer_kwargs=kwargs)

    def enter_layers(self, **forward_kwargs) -> tuple[torch.Tensor, tuple, dict]:
        """Run the backbone's own code up to decoder layer 0 with ``forward_kwargs``; return the
        hidden state and the other positional and keyword arguments it passes to the layers."""

        def grab(module, args, kwargs):
            raise _Captured(args, kwargs)

        handle = self.arch.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.arch.backbone(**forward_kwargs)
        except _Captured as c:
            args, kwargs = c.args, dict(c.kwargs)
        else:  # pragma: no cover - a model that never calls its first layer
            raise RuntimeError("the model's forward did not reach its first decoder layer")
        finally:
            handle.remove()
        if args:
            return args[0], tuple(args[1:]), kwargs
        return kwargs.pop("hidden_states"), (), kwargs

    def run_layers(self, st: ForwardState, until: int | None = None, hook: LayerHook | None = None) -> ForwardState:
        """Run decoder layers ``st.next_layer .. until`` (inclusive; None = all)."""
        last = self.num_layers - 1 if until is None else until
        h = st.hidden
        src = self.layer_source
        for i in range(st.next_layer, last + 1):
            if src is None:
                out = self.arch.layers[i](h, *st.layer_args, **st.layer_kwargs)
            else:
                src.before_layer(i)
                try:
                    out = self.arch.layers[i](h, *st.layer_args, **st.layer_kwargs)
                finally:
                    src.after_layer(i)
            h = out[0] if isinstance(out, tuple) else out
            if hook is not None:
                h = hook(i, h)
        st.hidden = h
        st.next_layer = last + 1
        return st

    def finish(self, st: ForwardState, last_only: bool = True) -> torch.Tensor:
        """Final norm and LM head. Returns float logits [q or 1, vocab]."""
        if st.next_layer != self.num_layers:
            raise RuntimeError(f"finish() before all layers ran (next layer {st.next_layer})")
        h = st.hidden[:, -1:] if last_only else st.hidden
        if self.arch.final_norm is not None:
            h = self.arch.final_norm(h)
        return self.arch.lm_head(h)[0].float()

    def forward(self, cache: PagedCache, input_ids: torch.Tensor, hook: LayerHook | None = None,
                last_only: bool = True) -> torch.Tensor:
        """A whole forward: the common case."""
        st = self.begin(cache, input_ids)
        self.run_layers(st, hook=hook)
        return self.finish(st, last_only=last_only)

    # ---- many sessions per forward (djinn.engine.batch) ---------------------------------
    def forward_batch(self, pool, items: list, backend=None, graphs=None) -> list[torch.Tensor]:
        """One forward for a packed batch of ``BatchItem``s; logits per item (see batch.py).
        Batches without hooks replay ``graphs`` (a StepGraphs) when one of its buckets fits."""
        from djinn.engine import batch

        return batch.forward_batch(self, pool, items, backend=backend, graphs=graphs)
