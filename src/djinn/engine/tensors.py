"""Server-side tensors that clients hold by handle (``RemoteTensor``): activations at a
breakpoint, logits of a forward, hidden states captured during a generation.

A handle is ``{"id", "shape", "dtype", "session_id"}`` (the protocol's ``tensor_ref``). Ids
are unique in the engine (``t1``, ``t2``, ...) and never reused, so a stale handle can never
name another tensor.

Invariants:
- every tensor belongs to exactly one session and is freed with it;
- per session, at most ``max_count`` tensors and ``max_bytes`` bytes are held. Adding one
  past either bound evicts that session's oldest *unpinned* tensors first (a paused
  forward pins its activation until it is resumed); fetching an evicted id is a clear
  InvalidRequest that says so. A tensor that cannot fit even after evicting every unpinned
  one is a CapacityError and nothing is evicted;
- stored tensors are never modified in place (the executor's layers produce new tensors),
  so a handle always reads what it was given.

Only the engine loop thread touches the store.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from djinn.errors import CapacityError, InvalidRequest

DEFAULT_MAX_COUNT = 64
DEFAULT_MAX_BYTES = 2 << 30
_FORGET_AFTER = 4096   # how many evicted/released ids we remember, to say "evicted" rather than "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _Entry:
    id: str
    session_id: str
    tensor: torch.Tensor
    pinned: bool = False

    @property
    def nbytes(self) -> int:
        return nbytes(self.tensor)

    def ref(self) -> dict:
        return {"id": self.id, "shape": list(self.tensor.shape), "dtype": dtype_name(self.tensor.dtype),
                "session_id": self.session_id}


class TensorStore:
    """Tensors held for clients, bounded per session."""

    def __init__(self, max_count: int = DEFAULT_MAX_COUNT, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_count < 2:
            raise ValueError("a session needs room for at least two tensors (activation and logits)")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._ids = itertools.count(1)
        self._entries: dict[str, _Entry] = {}
        self._by_session: dict[str, OrderedDict[str, _Entry]] = {}   # oldest first
        self._gone: dict[str, str] = {}                              # id -> why it is gone
        self._gone_order: deque[str] = deque()

    # ---- adding ---------------------------------------------------------------------
    def put(self, session_id: str, tensor: torch.Tensor, pinned: bool = False) -> dict:
        """Hold ``tensor`` for ``session_id``; returns its handle (``tensor_ref``)."""
        held = self._by_session.setdefault(session_id, OrderedDict())
        size = nbytes(tensor)
        victims = self._victims(held, size)
        for e in victims:
            self._drop(e, "it was evicted to make room for newer tensors of its session "
                          f"(at most {self.max_count} tensors and {self.max_bytes} bytes per session are kept)")
        entry = _Entry(f"t{next(self._ids)}", session_id, tensor, pinned)
        self._entries[entry.id] = entry
        held[entry.id] = entry
        return entry.ref()

    def _victims(self, held: OrderedDict[str, _Entry], size: int) -> list[_Entry]:
        count = len(held) + 1
        total = sum(e.nbytes for e in held.values()) + size
        victims = []
        for e in held.values():
            if count <= self.max_count and total <= self.max_bytes:
                break
            if not e.pinned:
                victims.append(e)
                count -= 1
                total -= e.nbytes
        if count > self.max_count or total > self.max_bytes:
            raise CapacityError(
                f"a session may hold at most {self.max_count} server-side tensors and {self.max_bytes} bytes; "
                f"this result needs {size} bytes and the session's pinned tensors take "
                f"{sum(e.nbytes for e in held.values() if e.pinned)}: resume paused forwards or release tensors")
        return victims

    def check_room(self, session_id: str, size: int) -> None:
        """Raise CapacityError now if a tensor of ``size`` bytes could not be added later."""
        self._victims(self._by_session.get(session_id, OrderedDict()), size)

    # ---- reading --------------------------------------------------------------------
    def entry(self, tensor_id: str) -> _Entry:
        if not isinstance(tensor_id, str):
            raise InvalidRequest(f"a tensor id is a string, got {type(tensor_id).__name__}")
        e = self._entries.get(tensor_id)
        if e is None:
            why = self._gone.get(tensor_id)
            if why is not None:
                raise InvalidRequest(f"tensor {tensor_id} is no longer held: {why}")
            raise InvalidRequest(f"unknown tensor id {tensor_id!r}: it never existed or its session was closed")
        return e

    def get(self, tensor_id: str, session_id: str) -> torch.Tensor:
        """The tensor of ``tensor_id``, which must belong to ``session_id``."""
        e = self.entry(tensor_id)
        if e.session_id != session_id:
            raise InvalidRequest(f"tensor {tensor_id} belongs to another session; an expression may only combine "
                                 "tensors of one session")
        return e.tensor

    def session_bytes(self, session_id: str) -> int:
        return sum(e.nbytes for e in self._by_session.get(session_id, {}).values())

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    # ---- freeing --------------------------------------------------------------------
    def unpin(self, tensor_id: str) -> None:
        e = self._entries.get(tensor_id)
        if e is not None:
            e.pinned = False

    def release(self, tensor_id: str) -> None:
        e = self.entry(tensor_id)
        if e.pinned:
            raise InvalidRequest(f"tensor {tensor_id} is the activation of a paused forward; resume it first")
        self._drop(e, "it was released")

    def drop_session(self, session_id: str) -> None:
        for e in list(self._by_session.pop(session_id, {}).values()):
            self._drop(e, "its session was closed")

    def _drop(self, e: _Entry, why: str) -> None:
        del self._entries[e.id]
        held = self._by_session.get(e.session_id)
        if held is not None:
            held.pop(e.id, None)
        self._gone[e.id] = why
        self._gone_order.append(e.id)
        while len(self._gone_order) > _FORGET_AFTER:
            self._gone.pop(self._gone_order.popleft(), None)
