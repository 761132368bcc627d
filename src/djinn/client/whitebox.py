"""The white-box side of the client: ``Paused`` (a forward stopped after a decoder layer),
``ForwardResult`` (``.logits``), and the interventions ``Scale`` and ``Add``.

Everything a backend receives from here is plain data: ids, torch tensors, expression trees
as dicts, interventions as ``{"kind", "layer", ...}`` maps (the protocol's shapes), so the
embedded and the remote backend take the same calls. Semantics: docs/whitebox.md.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from djinn.client.remote_tensor import RemoteTensor
from djinn.engine.requests import GenerateResult
from djinn.errors import InvalidRequest

if TYPE_CHECKING:  # pragma: no cover
    from djinn.client.handles import Session


def _positions(positions: Any) -> list[int] | None:
    if positions is None:
        return None
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        return [int(positions)]
    if isinstance(positions, torch.Tensor):
        positions = positions.reshape(-1).tolist()
    if isinstance(positions, range):
        positions = list(positions)
    if not isinstance(positions, (list, tuple)) or not all(
            isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in positions):
        raise InvalidRequest("positions must be None (every token) or a list of integer token positions")
    return [int(p) for p in positions]


def _layer(layer: Any) -> int:
    if not isinstance(layer, numbers.Integral) or isinstance(layer, bool) or layer < 0:
        raise InvalidRequest(f"layer must be a decoder layer index >= 0, got {layer!r}")
    return int(layer)


@dataclass(frozen=True)
class Scale:
    """Multiply the output hidden state of decoder ``layer`` by ``factor`` at ``positions``
    (absolute token positions in the session; negative ones count from its end; None: all
    tokens each forward computes), at every step of a generation."""

    layer: int
    factor: float
    positions: Sequence[int] | None = None

    def to_request(self) -> dict:
        if not isinstance(self.factor, numbers.Real) or isinstance(self.factor, bool):
            raise InvalidRequest(f"Scale.factor must be a number, got {self.factor!r}")
        return {"kind": "scale", "layer": _layer(self.layer), "factor": float(self.factor),
                "positions": _positions(self.positions)}


@dataclass(frozen=True)
class Add:
    """Add ``vector`` ([hidden], a steering vector) to the output hidden state of decoder
    ``layer`` at ``positions`` (as in :class:`Scale`), at every step of a generation."""

    layer: int
    vector: Any
    positions: Sequence[int] | None = None

    def to_request(self) -> dict:
        v = self.vector
        if isinstance(v, (list, tuple)):
            v = torch.tensor(v, dtype=torch.float32)
        if not isinstance(v, torch.Tensor):
            raise InvalidRequest(f"Add.vector must be a torch.Tensor of shape [hidden], got {type(v).__name__}")
        return {"kind": "add", "layer": _layer(self.layer), "vector": v, "positions": _positions(self.positions)}


def intervention_requests(interventions: Sequence[Any] | None) -> list[dict]:
    out = []
    for i, x in enumerate(interventions or ()):
        if not isinstance(x, (Scale, Add)):
            raise InvalidRequest(f"interventions[{i}] is a {type(x).__name__}; use djinn.Scale(...) or djinn.Add(...)")
        out.append(x.to_request())
    return out


@dataclass
class ForwardResult:
    """A completed forward: ``logits`` [tokens, vocab] (float32) stay on the server until fetched."""

    logits: RemoteTensor


class Paused:
    """A forward stopped after decoder ``layer`` (of decode step ``step`` inside a generation;
    0 = the prefill). ``activation`` is that layer's output hidden state, [tokens, hidden]."""

    def __init__(self, session: "Session", ref: dict):
        self.session = session
        self.id: str = ref["paused_id"]
        self.layer: int = ref["layer"]
        self.step: int = ref["step"]
        self.activation = RemoteTensor(session._backend, ref["activation"])

    def resume(self, activation: torch.Tensor | RemoteTensor | None = None):
        """Run the remaining layers and the head. ``activation``: None (unchanged), a
        torch.Tensor (sent), or a RemoteTensor expression such as ``p.activation * 0.9``
        (computed on the server). A forward returns a ``ForwardResult``; a generation
        continues to its end and returns its ``GenerateResult``."""
        backend = self.session._backend
        if activation is None:
            reply = backend.resume(self.id)
        elif isinstance(activation, RemoteTensor):
            if activation.session_id != self.session.id:
                raise InvalidRequest("the replacement is a remote tensor of another session; fetch() it first")
            tree, tensors = activation.encode()
            reply = backend.resume(self.id, tree, tensors)
        elif isinstance(activation, torch.Tensor):
            reply = backend.resume(self.id, activation)
        else:
            raise InvalidRequest("resume() takes nothing, a torch.Tensor or a RemoteTensor (e.g. p.activation * 0.9),"
                                 f" got {type(activation).__name__}")
        return from_reply(self.session, reply)

    def __repr__(self) -> str:
        return f"Paused({self.id}, layer={self.layer}, step={self.step}, activation={self.activation!r})"


def from_reply(session: "Session", reply: dict):
    """The user-facing object for a backend's forward/resume reply."""
    if reply.get("paused") is not None:
        return Paused(session, reply["paused"])
    if reply.get("generation") is not None:
        return wrap_generation(session, reply["generation"])
    return ForwardResult(logits=RemoteTensor(session._backend, reply["logits"]))


def wrap_generation(session: "Session", result: GenerateResult):
    """A paused generation becomes a ``Paused``; captured handles become RemoteTensors."""
    if result.paused is not None:
        return Paused(session, result.paused)
    backend = session._backend
    result.captured = {int(layer): ref if isinstance(ref, RemoteTensor) else RemoteTensor(backend, ref)
                       for layer, ref in result.captured.items()}
    return result
