"""Weight streaming: decoder layers live in one host arena and run from a ring of device slots.

For a model larger than its device budget, the parameters of the decoder layers are kept in a
``HostArena``: ONE contiguous host allocation (pinned on CUDA, so copies run on the DMA engines
at link speed), made once and never churned. The device holds the small rest of the model
(embeddings, norms, head) and a ring of K *slots*, one contiguous device buffer of K equal
slots, each as large as the largest streamed layer, so any layer fits any slot and a layer
larger than a slot cannot exist (the slot size is derived from the layers, never guessed).

``WeightStreamer`` is the executor's ``LayerSource``: ``before_layer(i)`` makes sure layer i's
bytes are in a slot (issuing the copy if not), makes the compute wait for that copy's fence,
and *rebinds* the layer's parameters to views into the slot; ``after_layer(i)`` rebinds them
back to their arena views, records a compute fence for the slot, and issues the copy of the
layer K positions ahead into a free slot. So while layer i computes, layers i+1..i+K-1 are on
their way, and the window wraps around the end of a forward: the next forward's first layers
are copied while the head, the sampler and the host run.

Invariants (checked by tests with a recording copy engine and with a slow CPU copy):
- compute never reads a slot before the copy of the layer it is bound to has landed
  (``wait`` on that copy's fence, before the layer runs);
- a slot is never overwritten before the layer that last read it has finished (every copy
  into a slot starts after the compute fence recorded when that slot's last layer finished);
- outside ``before_layer .. after_layer`` every parameter views the arena, so a paused forward
  (breakpoint), another session's forward, or anyone reading the weights sees the host copy:
  a pause at layer N of a streamed model is an ordinary pause.

Rebinding uses ``param.data = view``: the ``Parameter`` objects stay the same (tied weights,
hooks and references held elsewhere keep working), only their storage changes, and it costs
about a microsecond per tensor. Views are built once, outside inference mode, so they are
ordinary tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from djinn.memory.copier import Copier, copier_for

TENSOR_ALIGN = 256        # every tensor starts 256-byte aligned, like the allocators' own tensors
LAYER_ALIGN = 4096        # every layer starts on a page: whole-layer copies are page-aligned


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class _Entry:
    """One distinct parameter of a layer and where its bytes sit inside the layer's block."""

    holders: tuple[tuple[nn.Module, str], ...]   # every (module, attribute) that holds it (ties)
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _layer_plan(layer: nn.Module) -> tuple[list[_Entry], int]:
    """Byte layout of ``layer``'s distinct parameters (works on the meta device too)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, name))
                params[id(p)] = p
    entries, offset = [], 0
    for key, p in params.items():
        entries.append(_Entry(tuple(holders[key]), offset, tuple(p.shape), p.dtype))
        offset = _align(offset + _nbytes(p), TENSOR_ALIGN)
    return entries, _align(max(offset, 1), LAYER_ALIGN)


def _typed_view(buffer: torch.Tensor, offset: int, e: _Entry) -> torch.Tensor:
    return buffer[offset + e.offset: offset + e.offset + e.nbytes].view(e.dtype).view(e.shape)


class HostArena:
    """The parameters of the streamed decoder layers, in one host allocation.

    ``layers``: the streamed layers (``layer_ids[k]`` is the decoder index of ``layers[k]``).
    Building the arena only plans and allocates; ``place(k)`` moves layer k's parameters in.
    """

    def __init__(self, layers: Sequence[nn.Module], layer_ids: Sequence[int], *, pin: bool):
        if len(layers) != len(layer_ids) or not layers:
            raise ValueError("an arena needs at least one layer and one id per layer")
        self.layer_ids = list(layer_ids)
        self.plans: list[list[_Entry]] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        total = 0
        seen: set[int] = set()
        for layer in layers:
            entries, size = _layer_plan(layer)
            for e in entries:
                p = getattr(e.holders[0][0], e.holders[0][1])
                if id(p) in seen:
                    raise ValueError("a parameter shared between decoder layers cannot be streamed per layer")
                seen.add(id(p))
            self.plans.append(entries)
            self.offsets.append(total)
            self.sizes.append(size)
            total += size
        self.pinned = pin
        # the one allocation; pinned memory is rounded up by torch's host allocator, counted here as asked
        self.buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        self._base = self.buffer.data_ptr()
        self._layers = list(layers)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def max_layer_bytes(self) -> int:
        return max(self.sizes)

    @property
    def num_layers(self) -> int:
        return len(self.sizes)

    def layer_bytes(self, k: int) -> torch.Tensor:
        """Layer k's block of the arena as a 1-D byte tensor (what a slot copy reads)."""
        return self.buffer[self.offsets[k]: self.offsets[k] + self.sizes[k]]

    def contains(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and self._base <= t.data_ptr() < self._base + self.nbytes

    def place(self, k: int) -> None:
        """Give layer k's parameters arena storage: copy their current values in (unless they are
        on the meta device) and replace each ``Parameter`` by one that views the arena. The old
        tensors are released here, so a model can be moved in layer by layer."""
        for e in self.plans[k]:
            module, name = e.holders[0]
            old = module._parameters[name]
            view = _typed_view(self.buffer, self.offsets[k], e)
            if old.device.type != "meta":
                view.copy_(old.detach())
            new = nn.Parameter(view, requires_grad=False)
            for m, n in e.holders:
                m._parameters[n] = new

    def views_in(self, buffer: torch.Tensor, offset: int, k: int) -> list[torch.Tensor]:
        """Typed views of layer k's parameters laid out in ``buffer`` (bytes) from ``offset``,
        in the order of ``parameters(k)``."""
        return [_typed_view(buffer, offset, e) for e in self.plans[k]]

    def same_shapes(self, j: int, k: int) -> bool:
        return [(e.offset, e.shape, e.dtype) for e in self.plans[j]] == [(e.offset, e.shape, e.dtype) for e in self.plans[k]]

    def parameters(self, k: int) -> list[nn.Parameter]:
        return [getattr(e.holders[0][0], e.holders[0][1]) for e in self.plans[k]]


class WeightStreamer:
    """Runs the arena's layers from ``slots`` device slots; the executor's ``LayerSource``."""

    def __init__(self, arena: HostArena, device: torch.device, slots: int, chunk_bytes: int | None = None,
                 copier: Copier | None = None):
        if slots < 1:
            raise ValueError("weight streaming needs at least one device slot")
        self.arena = arena
        self.device = torch.device(device)
        self.num_slots = min(slots, arena.num_layers)   # more slots than layers would never be used
        self.chunk_bytes = chunk_bytes or None
        self.slot_bytes = arena.max_layer_bytes
        self.copier = copier or copier_for(self.device)
        self.ring = torch.empty(self.num_slots * self.slot_bytes, dtype=torch.uint8, device=self.device)
        self._pos = {layer: k for k, layer in enumerate(arena.layer_ids)}   # decoder index -> arena index
        self._params = [arena.parameters(k) for k in range(arena.num_layers)]
        for k, params in enumerate(self._params):
            if not all(arena.contains(p.data) for p in params):
                raise ValueError(f"streamed layer {arena.layer_ids[k]} has parameters outside the arena")
        self._host = [[p.data for p in params] for params in self._params]
        self._slot_views: dict[tuple[int, int], list[torch.Tensor]] = {}
        with torch.inference_mode(False):
            for s in range(self.num_slots):
                for k in range(arena.num_layers):
                    self._views(s, k)
        self._slot_layer: list[int | None] = [None] * self.num_slots   # arena index held (or arriving)
        self._slot_of: dict[int, int] = {}
        self._ready: list = [None] * self.num_slots    # fence: the last copy into the slot has landed
        self._free: list = [None] * self.num_slots     # fence: the last compute reading the slot is done
        self._running: int | None = None
        # hits: the layer was already in a slot (or on its way) when it was needed; misses: it was not
        self.counters = {"layer_loads": 0, "layer_hits": 0, "layer_misses": 0, "bytes_streamed": 0}

    # ---- the executor's hook --------------------------------------------------------
    def before_layer(self, layer: int) -> None:
        k = self._pos.get(layer)
        if k is None:
            return
        if self._running is not None:
            raise RuntimeError(f"layer {layer} started while streamed layer {self._running} is still bound")
        self.counters["layer_hits" if k in self._slot_of else "layer_misses"] += 1
        self._ensure(k)
        s = self._slot_of[k]
        try:
            self.copier.wait(self._ready[s])
        except BaseException:
            self.invalidate()  # the slots' contents are unknown now: the next forward reloads them
            raise
        for p, v in zip(self._params[k], self._slot_views[(s, k)]):
            p.data = v
        self._running = k

    def after_layer(self, layer: int) -> None:
        k = self._pos.get(layer)
        if k is None or self._running != k:
            return
        for p, v in zip(self._params[k], self._host[k]):
            p.data = v
        self._running = None
        s = self._slot_of[k]
        self._free[s] = self.copier.compute_fence()
        self._ensure((k + 1) % self.arena.num_layers)   # refill the ring K layers ahead

    # ---- control --------------------------------------------------------------------
    def invalidate(self) -> None:
        """Forget what the slots hold (the next forward starts cold). Fences stay: a later copy
        into a slot still waits for the compute that last read it."""
        self._slot_layer = [None] * self.num_slots
        self._slot_of.clear()

    def synchronize(self) -> None:
        self.copier.synchronize()

    def close(self) -> None:
        self.copier.close()

    @property
    def device_bytes(self) -> int:
        return self.ring.numel()

    def stats(self) -> dict:
        return {"slots": self.num_slots, "slot_bytes": self.slot_bytes, "chunk_bytes": self.chunk_bytes,
                "arena_bytes": self.arena.nbytes, "streamed_layers": self.arena.num_layers, **self.counters}

    # ---- internals ------------------------------------------------------------------
    def _views(self, s: int, k: int) -> list[torch.Tensor]:
        key = (s, k)
        if key not in self._slot_views:
            self._slot_views[key] = self.arena.views_in(self.ring, s * self.slot_bytes, k)
        return self._slot_views[key]

    def _window(self, k: int) -> list[int]:
        n = self.arena.num_layers
        return [(k + j) % n for j in range(min(self.num_slots, n))]

    def _ensure(self, k: int) -> None:
        """Make sure the K layers from arena index ``k`` on are in slots or on their way."""
        want = self._window(k)
        for j in want:
            if j not in self._slot_of:
                self._load(j, self._victim(want, k))

    def _victim(self, want: Iterable[int], k: int) -> int:
        """A slot whose layer is not wanted soon: an empty one, else the one needed last."""
        wanted = set(want)
        n = self.arena.num_layers
        best, best_dist = -1, -1
        for s, held in enumerate(self._slot_layer):
            if held is None:
                return s
            if held in wanted or held == self._running:
                continue
            dist = (held - k) % n
            if dist > best_dist:
                best, best_dist = s, dist
        if best < 0:  # pragma: no cover - len(want) <= slots makes this unreachable
            raise RuntimeError("no free slot in the weight ring")
        return best

    def _load(self, k: int, s: int) -> None:
        old = self._slot_layer[s]
        if old is not None:
            del self._slot_of[old]
        self._slot_layer[s] = k
        self._slot_of[k] = s
        src = self.arena.layer_bytes(k)
        dst = self.ring[s * self.slot_bytes: s * self.slot_bytes + src.numel()]
        # the copy starts only after the compute that last read this slot has finished
        self._ready[s] = self.copier.copy(dst, src, self.chunk_bytes, after=self._free[s])
        self.counters["layer_loads"] += 1
        self.counters["bytes_streamed"] += src.numel()
