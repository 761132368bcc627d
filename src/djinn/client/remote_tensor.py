"""``RemoteTensor``: a tensor that stays on the server until asked for, and lazy arithmetic on it.

A RemoteTensor is either a handle (``{"id", "shape", "dtype", "session_id"}``, e.g.
``p.activation``) or an expression over handles of one session built with ``* + - /``
(with numbers, client ``torch.Tensor`` s or other RemoteTensors, on either side), unary
``-`` and indexing. Expressions are recorded with the protocol's builder
(:class:`djinn.protocol.expr.Expr`) and evaluated on the server, in ``paused.resume(x)`` or
``x.fetch()``: steering a 4 MB activation by ``p.activation * 0.9`` sends a few bytes. Any
other operation raises :class:`~djinn.protocol.expr.UnsupportedOperation`, naming what is
supported. ``shape`` and ``dtype`` of an expression are worked out on the client with
meta tensors (no data, no round trip), which also reports a shape mismatch at once.
"""

from __future__ import annotations

from typing import Any

import torch

from djinn.errors import InvalidRequest
from djinn.protocol.expr import Expr, UnsupportedOperation, UnsupportedOperators, evaluate_expr

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}



class RemoteTensor(UnsupportedOperators):
    """A server-side tensor (or a lazy expression over some) of one session."""

    __slots__ = ("_backend", "_session_id", "_expr", "_refs", "_meta", "__weakref__")

    def __init__(self, backend, ref: dict | None = None, *, _expr: Expr | None = None,
                 _session_id: str | None = None, _refs: dict | None = None):
        self._backend = backend
        if ref is not None:
            self._expr = Expr.ref(ref["id"])
            self._session_id = ref["session_id"]
            self._refs = {ref["id"]: ref}        # id -> handle, for every tensor the expression reads
        else:
            self._expr, self._session_id, self._refs = _expr, _session_id, dict(_refs or {})
        self._meta: torch.Tensor | None = None

    # ---- what it is ---------------------------------------------------------------------
    @property
    def is_handle(self) -> bool:
        """True for a tensor held on the server, False for a lazy expression."""
        return "ref" in self._expr._node

    @property
    def id(self) -> str | None:
        """The server's tensor id (None for an expression)."""
        return self._expr._node["ref"] if self.is_handle else None

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def shape(self) -> torch.Size:
        return self._meta_value().shape

    @property
    def dtype(self) -> torch.dtype:
        return self._meta_value().dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def _meta_value(self) -> torch.Tensor:
        """The value's shape and dtype, computed on meta tensors (no data)."""
        if self._meta is None:
            tensors: list[torch.Tensor] = []
            tree = self._expr.encode(tensors)
            metas = {rid: torch.empty(r["shape"], dtype=_DTYPES[r["dtype"]], device="meta")
                     for rid, r in self._refs.items()}
            payload = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors]
            self._meta = evaluate_expr(tree, metas.__getitem__, payload)
        return self._meta

    # ---- getting the value ------------------------------------------------------------
    def fetch(self) -> torch.Tensor:
        """The value as a torch.Tensor on the client (an expression is evaluated on the server)."""
        if self.is_handle:
            return self._backend.fetch(self.id)
        tensors: list[torch.Tensor] = []
        tree = self._expr.encode(tensors)
        return self._backend.fetch(next(iter(self._refs)), expr=tree, tensors=tensors)

    def encode(self) -> tuple[dict, list[torch.Tensor]]:
        """The expression tree (plain data) and the client tensors it carries, for a backend."""
        tensors: list[torch.Tensor] = []
        return self._expr.encode(tensors), tensors

    def release(self) -> None:
        """Free the server's tensor now (it is freed with its session anyway)."""
        if not self.is_handle:
            raise InvalidRequest("only a tensor handle can be released; this is an expression over handles")
        self._backend.release(self.id)

    def __djinn_expr__(self) -> Expr:
        return self._expr

    # ---- lazy arithmetic ----------------------------------------------------------------
    def _combine(self, others: tuple, expr: Any) -> "RemoteTensor":
        refs = dict(self._refs)
        for o in others:
            if isinstance(o, RemoteTensor):
                if o._session_id != self._session_id or o._backend is not self._backend:
                    raise InvalidRequest("an expression can only combine remote tensors of one session; "
                                         "fetch() one of them first")
                refs.update(o._refs)
        out = RemoteTensor(self._backend, _expr=expr, _session_id=self._session_id, _refs=refs)
        out._meta_value()   # a shape mismatch is reported here, not at resume
        return out

    def _binary(self, op: str, other: Any) -> "RemoteTensor":
        expr = getattr(self._expr, op)(other)
        if expr is NotImplemented:
            sym = {"__add__": "+", "__sub__": "-", "__mul__": "*", "__truediv__": "/"}[op.replace("__r", "__")]
            raise UnsupportedOperation(f"{sym} with {type(other).__name__}")
        return self._combine((other,), expr)

    def __add__(self, o): return self._binary("__add__", o)
    def __radd__(self, o): return self._binary("__radd__", o)
    def __sub__(self, o): return self._binary("__sub__", o)
    def __rsub__(self, o): return self._binary("__rsub__", o)
    def __mul__(self, o): return self._binary("__mul__", o)
    def __rmul__(self, o): return self._binary("__rmul__", o)
    def __truediv__(self, o): return self._binary("__truediv__", o)
    def __rtruediv__(self, o): return self._binary("__rtruediv__", o)

    def __neg__(self) -> "RemoteTensor":
        return self._combine((), -self._expr)

    def __getitem__(self, key: Any) -> "RemoteTensor":
        return self._combine((), self._expr[key])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # torch.Tensor (op) RemoteTensor and torch.mul(t, r): record it like the operators do
        first = next(a for a in args if isinstance(a, RemoteTensor))
        lifted = tuple(a._expr if isinstance(a, RemoteTensor) else a for a in args)
        return first._combine(args, Expr.__torch_function__(func, (Expr,), lifted, kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise UnsupportedOperation(f".{name}")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        what = f"id={self.id}" if self.is_handle else f"lazy {self._expr!r}"
        try:
            shape = f"shape={list(self.shape)}, dtype={str(self.dtype).removeprefix('torch.')}"
        except InvalidRequest:
            shape = "shape=?"
        return f"RemoteTensor({what}, {shape})"
