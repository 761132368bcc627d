"""Interventions and captures: what a request does to decoder layers' output hidden states.

A request carries plain data (the protocol's ``interventions`` and ``capture``)::

    {"kind": "scale", "layer": 6, "factor": 0.9, "positions": None}
    {"kind": "add", "layer": 10, "vector": <tensor [hidden]>, "positions": [3, 4]}

:class:`LayerPlan` validates them once per request and, for each forward, builds the hook
called after every decoder layer (a ``BatchItem.hook`` or ``Executor.run_layers(hook=...)``,
engine/whitebox_step.py).

Semantics (docs/whitebox.md):
- an intervention at layer L replaces layer L's output hidden state ``h`` (the residual
  stream entering layer L+1) by ``h * factor`` or ``h + vector``, for the rows of the tokens
  it selects; interventions at one layer apply in request order, then the capture;
- ``positions`` are absolute token positions in the session (0 = the session's first token);
  a negative position counts from the end of the session as it stands in that forward
  (-1 = the newest token being computed, so in a generation -1 steers the last prompt token
  and then every generated token). ``None`` = every token the forward computes. Positions
  outside a forward's tokens do nothing in that forward;
- a capture at layer L records the rows of layer L's output (after its interventions) for
  every token computed, in order.
Arithmetic runs in the model's dtype (a vector is cast to it once), exactly like
``h * factor`` / ``h + vector`` in a forward hook.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from djinn.errors import InvalidRequest

MAX_INTERVENTIONS = 1024


@dataclass
class _Intervention:
    kind: str                     # "scale" | "add"
    layer: int
    factor: float | None
    vector: torch.Tensor | None   # [hidden], on the device, in the model's dtype
    positions: list[int] | None


def _layer(value: Any, num_layers: int, what: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value < num_layers:
        raise InvalidRequest(f"{what} must be a decoder layer index in [0, {num_layers - 1}], got {value!r}")
    return int(value)


def _positions(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in value):
        raise InvalidRequest(f"{where}.positions must be None or a list of integer token positions")
    return [int(p) for p in value]


def parse_vector(v: Any, hidden: int, device: torch.device, dtype: torch.dtype, where: str) -> torch.Tensor:
    """A steering vector: ``[hidden]`` floats, finite; returned on the device in ``dtype``
    (a copy, so the caller changing its tensor later changes nothing here)."""
    if isinstance(v, (list, tuple)):
        try:
            v = torch.tensor(v, dtype=torch.float32)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{where}.vector must be a list of numbers or a tensor") from None
    if not isinstance(v, torch.Tensor):
        raise InvalidRequest(f"{where}.vector must be a torch.Tensor of shape [{hidden}], got {type(v).__name__}")
    if not v.dtype.is_floating_point:
        raise InvalidRequest(f"{where}.vector must be floating point, got {v.dtype}")
    if tuple(v.shape) != (hidden,):
        raise InvalidRequest(f"{where}.vector must have shape [{hidden}] (the model's hidden size), "
                             f"got {list(v.shape)}")
    if v.device.type not in ("cpu", device.type) or v.device.type == "meta":
        raise InvalidRequest(f"{where}.vector is on {v.device}; give a CPU tensor or one on {device}")
    if not bool(torch.isfinite(v).all()):
        raise InvalidRequest(f"{where}.vector contains NaN or infinity")
    return v.detach().to(device=device, dtype=dtype, copy=True)


class LayerPlan:
    """The validated interventions and captures of one request."""

    def __init__(self, interventions: Sequence[dict], capture: Sequence[int], num_layers: int, hidden: int,
                 device: torch.device, dtype: torch.dtype):
        if not isinstance(interventions, (list, tuple)) or len(interventions) > MAX_INTERVENTIONS:
            raise InvalidRequest(f"interventions must be a list of at most {MAX_INTERVENTIONS}")
        self.items: list[_Intervention] = []
        for i, spec in enumerate(interventions):
            where = f"interventions[{i}]"
            if not isinstance(spec, dict) or spec.get("kind") not in ("scale", "add"):
                raise InvalidRequest(f"{where} must be djinn.Scale(...) or djinn.Add(...) "
                                     "(a map with kind 'scale' or 'add')")
            kind = spec["kind"]
            allowed = {"kind", "layer", "positions", "factor" if kind == "scale" else "vector"}
            if set(spec) - allowed or "layer" not in spec:
                raise InvalidRequest(f"{where}: a {kind} intervention has fields {sorted(allowed)}, got {sorted(spec)}")
            layer = _layer(spec["layer"], num_layers, f"{where}.layer")
            factor = vector = None
            if kind == "scale":
                factor = spec.get("factor")
                if not isinstance(factor, numbers.Real) or isinstance(factor, bool) or not math.isfinite(factor):
                    raise InvalidRequest(f"{where}.factor must be a finite number, got {factor!r}")
                factor = float(factor)
            else:
                vector = parse_vector(spec.get("vector"), hidden, device, dtype, where)
            self.items.append(_Intervention(kind, layer, factor, vector, _positions(spec.get("positions"), where)))
        if not isinstance(capture, (list, tuple)):
            raise InvalidRequest("capture must be a list of decoder layer indices")
        self.capture = [_layer(c, num_layers, "capture layer") for c in capture]
        if len(set(self.capture)) != len(self.capture):
            raise InvalidRequest("capture lists a layer twice")
        self.captured: dict[int, list[torch.Tensor]] = {c: [] for c in self.capture}
        self.layers = {x.layer for x in self.items} | set(self.capture)

    def __bool__(self) -> bool:
        return bool(self.layers)

    def hook(self, start: int, num_tokens: int, end: int | None = None):
        """The layer hook for a forward computing session positions
        ``start .. start + num_tokens - 1``; None when the request touches no layer. ``end``:
        where the session ends in this forward, from which negative positions count (default
        ``start + num_tokens``; a prompt computed in chunks passes the end of its last chunk)."""
        if not self:
            return None
        stop = start + num_tokens
        end = stop if end is None else end
        rows = {id(x): _rows(x.positions, start, stop, end) for x in self.items}

        def hook(layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer not in self.layers:
                return h
            for x in self.items:
                if x.layer != layer:
                    continue
                r = rows[id(x)]
                if r is None:        # every row
                    h = h * x.factor if x.kind == "scale" else h + x.vector
                elif r:              # some rows; the others keep their exact values
                    h = h.clone()
                    sel = h[:, r]
                    h[:, r] = sel * x.factor if x.kind == "scale" else sel + x.vector
            if layer in self.captured:
                self.captured[layer].append(h[0])
            return h

        return hook

    def replace_last_capture(self, layer: int, h: torch.Tensor) -> None:
        """A resumed breakpoint at ``layer`` replaced its output: the capture records that."""
        if layer in self.captured and self.captured[layer]:
            self.captured[layer][-1] = h

    def captured_tensors(self) -> dict[int, torch.Tensor]:
        return {layer: torch.cat(chunks, dim=0) for layer, chunks in self.captured.items() if chunks}


def _rows(positions: list[int] | None, start: int, stop: int, end: int) -> list[int] | None:
    """Rows of the hidden state of positions ``start..stop-1`` selected by ``positions`` (None =
    all); a negative position counts from ``end``."""
    if positions is None:
        return None
    out = set()
    for p in positions:
        absolute = p if p >= 0 else end + p
        if start <= absolute < stop:
            out.add(absolute - start)
    return sorted(out)
