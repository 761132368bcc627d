"""One white-box forward of one session in flight: run it to a layer, pause, resume, finish.

A ``forward``, each step of a white-box ``generate`` and a resume run the numerics of the
plain path beside them, so pausing, an intervention or a capture changes nothing else:

- where plain turns are batched (``EngineConfig.batching``, weights resident: the condition of
  ``Engine._generate``), a step is a one-item batch through engine/batch.py (``BatchedStep``):
  Djinn's paged attention backend and, on CUDA, the fused norm/rotary kernels, the kernels a
  plain turn's step runs; a whole step without a hook (not paused) replays the batcher's CUDA
  graph for its token count, as a plain step does; the layer hook is the item's ``BatchItem.hook``;
- otherwise (batching off, streamed weights: ``Engine._run_turn``) it is the single-session
  Executor over a ``PagedCache`` (``SerialStep``), with the weight streamer as layer source.

So a forward paused after layer N and resumed unchanged computes what the same forward
unpaused computes, bit for bit, on any device. Whether a plain turn computes the same bits
as well depends on its shapes: a plain prefill runs in chunks of ``prefill_chunk_tokens``, a
plain step may share its matrices with other sessions' rows, and a step that replays a graph
computes over its token bucket, padded; a paused step runs eagerly over its own tokens.

A step holds what finishing it needs: the layer arguments the model's own code built, its
block table (``rebind`` re-points it after the session's blocks moved while paused) and its
hook. Invariant: when ``run(until=N)`` returns, layers ``0..N`` of every token of the step
have written their K/V into the step's blocks, and ``hidden`` is layer N's output after the hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

import torch

from djinn.engine.batch import BatchItem, BatchState, begin_batch, finish_batch, forward_batch, run_batch_layers
from djinn.engine.cache import PagedCache
from djinn.engine.executor import Executor, ForwardState

if TYPE_CHECKING:  # pragma: no cover
    from djinn.engine.engine import Engine
    from djinn.engine.runtime import ModelRuntime

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


class Step(ABC):
    """``tokens`` at session positions ``start..``, a hook after every decoder layer."""

    start: int
    tokens: list[int]
    hook: LayerHook | None
    all_logits: bool                   # logits of every token, else of the last one

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    @abstractmethod
    def next_layer(self) -> int:
        """The first decoder layer still to run."""

    @property
    @abstractmethod
    def hidden(self) -> torch.Tensor:
        """``[1, tokens, hidden]``: the output of layer ``next_layer - 1`` (after its hook)."""

    @hidden.setter
    @abstractmethod
    def hidden(self, value: torch.Tensor) -> None: ...

    @abstractmethod
    def run(self, until: int | None = None) -> None:
        """Decoder layers ``next_layer .. until`` (inclusive; None = all)."""

    @abstractmethod
    def finish(self) -> torch.Tensor:
        """The remaining layers, the final norm and the LM head: float logits ``[tokens or 1, vocab]``."""

    @abstractmethod
    def rebind(self, block_table: list[int]) -> None:
        """Use ``block_table`` from now on (the session's blocks moved while it was paused)."""

    @abstractmethod
    def fork(self, block_table: list[int] | None, hidden: torch.Tensor, hook: LayerHook | None) -> "Step":
        """The same step at the same layer over ``block_table`` (None: this one's, rebound at
        the fork's resume) with its own ``hidden`` and ``hook``."""


class BatchedStep(Step):
    """A one-item batch (engine/batch.py): the numerics of the batched plain path."""

    def __init__(self, executor: Executor, pool, block_table: list[int], start: int, tokens: list[int],
                 hook: LayerHook | None, all_logits: bool, graphs=None):
        self.executor, self.pool, self.graphs = executor, pool, graphs
        self.start, self.tokens, self.hook, self.all_logits = start, list(tokens), hook, all_logits
        self._table = list(block_table)
        self._st: BatchState | None = None     # begun on first use: a whole step may replay a graph instead

    def _item(self) -> BatchItem:
        return BatchItem(block_table=self._table, start=self.start, tokens=self.tokens, hook=self.hook,
                         all_logits=self.all_logits)

    def _state(self) -> BatchState:
        if self._st is None:
            self._st = begin_batch(self.executor, self.pool, [self._item()])
        return self._st

    @property
    def next_layer(self) -> int:
        return 0 if self._st is None else self._st.next_layer

    @property
    def hidden(self) -> torch.Tensor:
        return self._state().hidden

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        self._state().hidden = value

    def run(self, until: int | None = None) -> None:
        run_batch_layers(self.executor, self._state(), until)

    def finish(self) -> torch.Tensor:
        if self._st is None:   # the whole step at once: what a plain step runs (a graph for an unhooked decode)
            return forward_batch(self.executor, self.pool, [self._item()], graphs=self.graphs)[0]
        if self._st.next_layer < self.executor.num_layers:
            self.run()
        return finish_batch(self.executor, self._st)[0]

    def _need(self) -> int:
        return self.pool.shape.blocks_for(self.start + len(self.tokens))

    def rebind(self, block_table: list[int]) -> None:
        n = self._need()
        if list(block_table[:n]) == self._table[:n]:
            return                    # nothing moved
        self._table = list(block_table)
        if self._st is not None:
            self._st = self._resumed_state(self._st.hidden, self._st.next_layer)

    def _resumed_state(self, hidden: torch.Tensor, next_layer: int) -> BatchState:
        # the layer arguments (positions, rotary, the attention metadata over the block table)
        # are rebuilt by the model's own code, as split_batch does; no K/V is written again
        st = begin_batch(self.executor, self.pool, [self._item()])
        st.hidden, st.next_layer = hidden, next_layer
        return st

    def fork(self, block_table: list[int] | None, hidden: torch.Tensor, hook: LayerHook | None) -> "BatchedStep":
        child = BatchedStep(self.executor, self.pool, self._table if block_table is None else block_table,
                            self.start, self.tokens, hook, self.all_logits, self.graphs)
        child._st = child._resumed_state(hidden, self.next_layer)
        return child


class SerialStep(Step):
    """The single-session Executor over a PagedCache: the numerics of ``Engine._run_turn``."""

    def __init__(self, executor: Executor, cache: PagedCache, tokens: list[int], hook: LayerHook | None,
                 all_logits: bool, state: ForwardState | None = None):
        self.executor, self.cache = executor, cache
        self.start, self.tokens, self.hook, self.all_logits = cache.start, list(tokens), hook, all_logits
        if state is None:
            ids = torch.tensor([self.tokens], dtype=torch.long, device=cache.pool.device)
            state = executor.begin(cache, ids)
        self._st = state

    @property
    def next_layer(self) -> int:
        return self._st.next_layer

    @property
    def hidden(self) -> torch.Tensor:
        return self._st.hidden

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        self._st.hidden = value

    def run(self, until: int | None = None) -> None:
        self.executor.run_layers(self._st, until=until, hook=self.hook)

    def finish(self) -> torch.Tensor:
        if self._st.next_layer < self.executor.num_layers:
            self.run()
        return self.executor.finish(self._st, last_only=not self.all_logits)

    def rebind(self, block_table: list[int]) -> None:
        self.cache.rebind(block_table)   # in place: the captured layer arguments refer to the cache

    def fork(self, block_table: list[int] | None, hidden: torch.Tensor, hook: LayerHook | None) -> "SerialStep":
        old = self.cache
        cache = PagedCache(old.pool, list(old._bound) if block_table is None else block_table, old.start, old.new)
        swap = lambda x: cache if x is old else x  # noqa: E731 - the layer arguments refer to the cache
        st = self._st
        state = ForwardState(cache=cache, hidden=hidden, next_layer=st.next_layer,
                             layer_args=tuple(swap(a) for a in st.layer_args),
                             layer_kwargs={k: swap(v) for k, v in st.layer_kwargs.items()})
        return SerialStep(self.executor, cache, self.tokens, hook, self.all_logits, state=state)


def batched(engine: "Engine", rt: "ModelRuntime") -> bool:
    """Whether plain turns of ``rt`` run batched (the condition ``Engine._generate`` uses)."""
    return engine.config.batching and rt.streamer is None


def chunk_tokens(engine: "Engine", rt: "ModelRuntime") -> int | None:
    """The longest prefill a plain turn computes in one step (None: the whole prompt at once)."""
    return engine.batcher.prefill_chunk_tokens if batched(engine, rt) else None


def open_step(engine: "Engine", rt: "ModelRuntime", block_table: list[int], start: int, tokens: list[int],
              hook: LayerHook | None, all_logits: bool = False) -> Step:
    """A step over ``tokens`` (positions ``start..``) on the path plain turns of ``rt`` take.
    The caller has grown ``block_table`` to hold them."""
    if batched(engine, rt):
        # a whole step without a hook replays the batcher's graph for its token count when one
        # fits (``graphs.accepts``), as a plain step of the same tokens does
        graphs = engine.batcher.runner.graphs_for(rt, len(tokens)) if hook is None and not all_logits else None
        return BatchedStep(rt.executor, rt.pool, block_table, start, tokens, hook, all_logits, graphs)
    return SerialStep(rt.executor, PagedCache(rt.pool, block_table, start, len(tokens)), tokens, hook, all_logits)
