"""Lazy remote-tensor expressions: ``p.activation * 0.9`` computed on the server.

An expression is a JSON-like tree in the message header, built from a closed registry of
operations; nothing in it names a function or a class, so evaluating it can only ever do
the arithmetic listed here.

Leaves::

    {"ref": "<tensor id>"}        a tensor held by the server
    {"tensor": <payload index>}   a tensor the client sent in this frame's payload
    {"scalar": <int or float>}

Operations::

    {"op": "add" | "sub" | "mul" | "div", "args": [a, b]}   elementwise, broadcasting
    {"op": "neg", "args": [a]}
    {"op": "getitem", "args": [a], "index": [item, ...]}
        item: {"int": i} | {"slice": [start, stop, step]} (each int or None, step >= 1)
              | {"none": true} (a new axis) | {"ellipsis": true} (at most one)

Reversed forms (``2 - x``, ``1 / x``) are the same ops with the arguments swapped. A binary op
needs at least one tensor-valued argument, and the whole tree must be tensor-valued.

:class:`Expr` builds trees with Python operators on the client; :func:`validate_expr`
bounds depth and size; :func:`evaluate_expr` runs a tree on the server.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch

from djinn.errors import InvalidRequest
from djinn.protocol.schema import ID_PATTERN

BINARY_OPS: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
}
OPS = (*BINARY_OPS, "neg", "getitem")
MAX_INDEX_ITEMS = 16
DEFAULT_MAX_NUMEL = 1 << 28  # the largest intermediate result evaluate_expr will build
SUPPORTED = ("+, -, *, / with a number, a client torch.Tensor or another remote tensor (on either "
             "side), unary -, and indexing x[...] with ints, slices (step >= 1), None and ...")
_INT64 = (-(2**63), 2**63 - 1)


class UnsupportedOperation(InvalidRequest, AttributeError):
    """An operation a remote expression cannot express (also an AttributeError so that
    ``hasattr(expr, "sum")`` is simply False)."""

    def __init__(self, what: str):
        super().__init__(f"{what} is not supported on a remote tensor; supported: {SUPPORTED}. "
                         f"Call .fetch() to get a torch.Tensor and compute anything else on the client.")


# ---------------------------------------------------------------- validation

def _fail(path: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{path}: {message}")


def _check_int(v: Any, path: str) -> None:
    if type(v) is not int or not _INT64[0] <= v <= _INT64[1]:
        raise _fail(path, f"expected a 64-bit int, got {type(v).__name__} {v!r:.40}")


def _check_index(index: Any, path: str) -> None:
    if type(index) is not list or len(index) > MAX_INDEX_ITEMS:
        raise _fail(path, f"index must be a list of at most {MAX_INDEX_ITEMS} items")
    ellipses = 0
    for i, item in enumerate(index):
        where = f"{path}[{i}]"
        if type(item) is not dict or len(item) != 1:
            raise _fail(where, "an index item is a map with one key: int, slice, none or ellipsis")
        (kind, v), = item.items()
        if kind == "int":
            _check_int(v, where)
        elif kind == "slice":
            if type(v) is not list or len(v) != 3:
                raise _fail(where, "a slice is [start, stop, step]")
            for part in v:
                if part is not None:
                    _check_int(part, where)
            if v[2] is not None and v[2] < 1:
                raise _fail(where, f"slice step must be >= 1, got {v[2]}")
        elif kind in ("none", "ellipsis"):
            if v is not True:
                raise _fail(where, f"{{{kind!r}: true}} expected")
            ellipses += kind == "ellipsis"
        else:
            raise _fail(where, f"unknown index kind {kind!r}; use int, slice, none or ellipsis")
    if ellipses > 1:
        raise _fail(path, "an index can have only one ellipsis (...)")


def validate_expr(tree: Any, max_depth: int = 32, max_nodes: int = 256,
                  n_tensors: int | None = None, path: str = "expr") -> int:
    """Check a tree's structure and bounds; returns its node count, raises InvalidRequest.

    ``n_tensors`` (the frame's tensor count) also bounds ``{"tensor": i}`` leaves."""
    count = 0

    def visit(node: Any, depth: int, where: str) -> bool:  # True when tensor-valued
        nonlocal count
        count += 1
        if count > max_nodes:
            raise _fail(path, f"expression has more than {max_nodes} nodes")
        if depth > max_depth:
            raise _fail(path, f"expression is deeper than {max_depth} levels")
        if type(node) is not dict:
            raise _fail(where, f"expected an expression node (a map), got {type(node).__name__}")
        if "op" not in node:
            if len(node) != 1:
                raise _fail(where, f"a leaf is one of {{ref}}, {{tensor}}, {{scalar}}; got keys {sorted(node)}")
            (kind, v), = node.items()
            if kind == "ref":
                if type(v) is not str or not ID_PATTERN.fullmatch(v):
                    raise _fail(where, f"tensor id must be a string like 't12', got {v!r:.40}")
                return True
            if kind == "tensor":
                if type(v) is not int or v < 0 or (n_tensors is not None and v >= n_tensors):
                    raise _fail(where, f"tensor index {v!r} is not one of the frame's {n_tensors} tensors")
                return True
            if kind == "scalar":
                if type(v) not in (int, float) or (type(v) is int and not _INT64[0] <= v <= _INT64[1]):
                    raise _fail(where, f"a scalar is an int or float, got {type(v).__name__}")
                return False
            raise _fail(where, f"unknown leaf {kind!r}; leaves are ref, tensor, scalar")
        op, args = node["op"], node.get("args")
        if type(op) is not str:
            raise _fail(where, f"op must be a string, got {type(op).__name__}")
        allowed = {"op", "args", "index"} if op == "getitem" else {"op", "args"}
        if set(node) != allowed:
            raise _fail(where, f"op {op!r} takes fields {sorted(allowed)}, got {sorted(node)}")
        arity = 2 if op in BINARY_OPS else 1 if op in ("neg", "getitem") else None
        if arity is None:
            raise _fail(where, f"unknown op {op!r}; supported: {', '.join(OPS)}")
        if type(args) is not list or len(args) != arity:
            raise _fail(where, f"op {op!r} takes {arity} argument(s)")
        tensors = [visit(a, depth + 1, f"{where}.args[{i}]") for i, a in enumerate(args)]
        if not any(tensors):
            raise _fail(where, f"op {op!r} needs a tensor argument, not only scalars")
        if op == "getitem":
            _check_index(node["index"], f"{where}.index")
        return True

    if not visit(tree, 1, path):
        raise _fail(path, "an expression must be tensor-valued (a lone scalar is not)")
    return count


# ---------------------------------------------------------------- evaluation (server)

def _index(items: list[dict]) -> tuple:
    out: list[Any] = []
    for item in items:
        (kind, v), = item.items()
        out.append(v if kind == "int" else slice(*v) if kind == "slice" else None if kind == "none" else Ellipsis)
    return tuple(out)


def _shape(x: Any) -> list[int]:
    return list(x.shape) if isinstance(x, torch.Tensor) else []


def evaluate_expr(tree: Any, resolve_ref: Callable[[str], torch.Tensor], payload: Sequence[torch.Tensor],
                  *, max_numel: int = DEFAULT_MAX_NUMEL, max_depth: int = 32, max_nodes: int = 256) -> torch.Tensor:
    """Evaluate a tree; ``resolve_ref`` maps a tensor id to the server's tensor (raising its own
    typed error for unknown ids). Client tensors move to the device of the tensor they meet.
    The result may be a view of a resolved tensor: clone it before modifying it in place."""
    validate_expr(tree, max_depth, max_nodes, len(payload))

    def ev(node: dict) -> Any:
        if "ref" in node:
            return resolve_ref(node["ref"])
        if "tensor" in node:
            return payload[node["tensor"]]
        if "scalar" in node:
            return node["scalar"]
        op, args = node["op"], [ev(a) for a in node["args"]]
        if op == "neg":
            try:
                return torch.neg(args[0])
            except RuntimeError as exc:  # e.g. a bool tensor
                raise InvalidRequest(f"cannot negate a {args[0].dtype} tensor: {exc}") from None
        if op == "getitem":
            try:
                return args[0][_index(node["index"])]
            except (IndexError, RuntimeError, TypeError, ValueError) as exc:
                raise InvalidRequest(f"cannot index a tensor of shape {_shape(args[0])}: {exc}") from None
        a, b = args
        try:
            shape = torch.broadcast_shapes(torch.Size(_shape(a)), torch.Size(_shape(b)))
        except RuntimeError:
            raise InvalidRequest(f"cannot {op} tensors of shapes {_shape(a)} and {_shape(b)}: "
                                 f"they do not broadcast") from None
        if shape.numel() > max_numel:
            raise InvalidRequest(f"{op} of shapes {_shape(a)} and {_shape(b)} would build {shape.numel()} "
                                 f"elements; the limit is {max_numel}")
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device != b.device:
            a, b = (a.to(b.device), b) if a.device.type == "cpu" else (a, b.to(a.device))
        try:
            return BINARY_OPS[op](a, b)
        except RuntimeError as exc:
            raise InvalidRequest(f"cannot {op} {_shape(a)} and {_shape(b)}: {exc}") from None

    return ev(tree)


# ---------------------------------------------------------------- builder (client)

def _lift(x: Any) -> dict | None:
    """The tree node for an operand, or None when the operand is not supported."""
    if isinstance(x, Expr):
        return x._node
    if hasattr(x, "__djinn_expr__"):  # e.g. the client's RemoteTensor
        return x.__djinn_expr__()._node
    if isinstance(x, torch.Tensor):
        return {"tensor": x}  # placeholder holding the tensor itself until encode()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    v = int(x) if isinstance(x, numbers.Integral) else float(x)
    if type(v) is int and not _INT64[0] <= v <= _INT64[1]:
        raise InvalidRequest(f"scalar {v} does not fit in 64 bits")
    return {"scalar": v}


def _unsupported(what: str) -> Callable:
    def method(self, *args, **kwargs):
        raise UnsupportedOperation(what)
    method.__name__ = what
    return method


class UnsupportedOperators:
    """The operators a lazy remote expression refuses, each with an error that names it (the
    supported ones are ``+ - * /``, unary ``-`` and indexing). Shared by ``Expr`` and the
    client's ``RemoteTensor``."""

    __slots__ = ()

    __matmul__ = __rmatmul__ = _unsupported("@ (matmul)")
    __pow__ = __rpow__ = _unsupported("** (pow)")
    __floordiv__ = __rfloordiv__ = _unsupported("// (floordiv)")
    __mod__ = __rmod__ = _unsupported("% (mod)")
    __abs__ = _unsupported("abs()")
    __pos__ = _unsupported("unary +")
    __invert__ = _unsupported("~ (invert)")
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = _unsupported("&, |, ^ (bitwise)")
    __lshift__ = __rshift__ = _unsupported("<<, >> (shift)")
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = _unsupported("comparison")
    __bool__ = _unsupported("bool() (the value is only known on the server)")
    __len__ = _unsupported("len()")
    __iter__ = _unsupported("iteration")
    __int__ = __float__ = __index__ = _unsupported("conversion to a Python number")
    __setitem__ = _unsupported("item assignment (expressions are immutable; build a new one)")


class Expr(UnsupportedOperators):
    """A lazy expression over remote tensors, built with ``+ - * /``, unary ``-`` and ``[]``.

    >>> e = (Expr.ref("t1") * 0.9 + Expr.tensor(torch.ones(4)))[..., :2]
    >>> tensors = []; tree = e.encode(tensors)   # tree for the header, tensors for the payload
    """

    __slots__ = ("_node",)

    def __init__(self, node: dict):
        self._node = node

    @classmethod
    def ref(cls, tensor_id: str) -> "Expr":
        if not isinstance(tensor_id, str) or not ID_PATTERN.fullmatch(tensor_id):
            raise InvalidRequest(f"not a tensor id: {tensor_id!r}")
        return cls({"ref": tensor_id})

    @classmethod
    def tensor(cls, tensor: torch.Tensor) -> "Expr":
        if not isinstance(tensor, torch.Tensor):
            raise InvalidRequest(f"Expr.tensor needs a torch.Tensor, got {type(tensor).__name__}")
        return cls({"tensor": tensor})

    def encode(self, tensors: list[torch.Tensor], max_nodes: int = 256) -> dict:
        """The wire tree; client tensors are appended to ``tensors`` (once each) and
        replaced by their payload index. ``x = x + x`` shares nodes in memory but doubles
        the tree, so encoding stops with InvalidRequest past ``max_nodes``."""
        seen = {id(t): i for i, t in enumerate(tensors)}
        count = 0

        def enc(node: dict) -> dict:
            nonlocal count
            count += 1
            if count > max_nodes:
                raise InvalidRequest(f"expression has more than {max_nodes} nodes; fetch() and "
                                     f"compute on the client, or build a smaller expression")
            if "tensor" in node:
                t = node["tensor"]
                if id(t) not in seen:
                    seen[id(t)] = len(tensors)
                    tensors.append(t)
                return {"tensor": seen[id(t)]}
            if "op" in node:
                return {**node, "args": [enc(a) for a in node["args"]]}
            return dict(node)

        return enc(self._node)

    def ref_ids(self) -> list[str]:
        """The ids of the remote tensors the expression reads, in first-use order."""
        out: list[str] = []
        stack, seen = [self._node], set()
        while stack:  # iterative, and each shared node once: x = x + x builds a DAG
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if "ref" in node and node["ref"] not in out:
                out.append(node["ref"])
            stack.extend(reversed(node.get("args", ())))
        return out

    def _binary(self, op: str, other: Any, reverse: bool = False) -> "Expr":
        node = _lift(other)
        if node is None:  # raised rather than NotImplemented: list * Expr would call __index__
            raise UnsupportedOperation(f"{_SYMBOL[op]} with a {type(other).__name__} operand")
        return Expr({"op": op, "args": [node, self._node] if reverse else [self._node, node]})

    def __add__(self, o): return self._binary("add", o)
    def __radd__(self, o): return self._binary("add", o, True)
    def __sub__(self, o): return self._binary("sub", o)
    def __rsub__(self, o): return self._binary("sub", o, True)
    def __mul__(self, o): return self._binary("mul", o)
    def __rmul__(self, o): return self._binary("mul", o, True)
    def __truediv__(self, o): return self._binary("div", o)
    def __rtruediv__(self, o): return self._binary("div", o, True)

    def __neg__(self) -> "Expr":
        return Expr({"op": "neg", "args": [self._node]})

    def __getitem__(self, key: Any) -> "Expr":
        items = []
        for k in key if isinstance(key, tuple) else (key,):
            if k is None:
                items.append({"none": True})
            elif k is Ellipsis:
                items.append({"ellipsis": True})
            elif isinstance(k, slice):
                parts = [None if p is None else _as_int(p) for p in (k.start, k.stop, k.step)]
                items.append({"slice": parts})
            elif isinstance(k, numbers.Integral) and not isinstance(k, bool):
                items.append({"int": int(k)})
            else:
                raise UnsupportedOperation(f"indexing with {type(k).__name__}")
        _check_index(items, "index")
        return Expr({"op": "getitem", "args": [self._node], "index": items})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # reached for torch.Tensor (op) Expr, torch.mul(t, e), t.mul(e), torch.neg(e), ...
        name = getattr(func, "__name__", str(func))
        op = _TORCH_OPS.get(name)
        if op is not None and not kwargs:
            nodes = [_lift(a) for a in args]
            if None not in nodes and len(nodes) == (1 if op == "neg" else 2):
                return Expr({"op": op, "args": nodes})
        if op is not None:
            raise UnsupportedOperation(f"torch.{name} with arguments {[type(a).__name__ for a in args]}"
                                       f"{' and keywords ' + str(sorted(kwargs)) if kwargs else ''}")
        raise UnsupportedOperation(f"torch.{name}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise UnsupportedOperation(f".{name}")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Expr({_fmt(self._node, [64])})"


_TORCH_OPS = {
    **{n: n for n in ("add", "sub", "mul", "div", "neg")},
    "__add__": "add", "__sub__": "sub", "__mul__": "mul", "__truediv__": "div", "__neg__": "neg",
    "subtract": "sub", "multiply": "mul", "divide": "div", "true_divide": "div", "negative": "neg",
}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def _as_int(p: Any) -> int:
    if isinstance(p, numbers.Integral) and not isinstance(p, bool):
        return int(p)
    raise UnsupportedOperation(f"a slice bound of type {type(p).__name__}")


def _fmt(node: dict, budget: list[int]) -> str:
    budget[0] -= 1
    if budget[0] < 0:
        return "..."
    if "ref" in node:
        return f"ref({node['ref']!r})"
    if "tensor" in node:
        t = node["tensor"]
        return f"tensor({list(t.shape) if isinstance(t, torch.Tensor) else t})"
    if "scalar" in node:
        return repr(node["scalar"])
    args = [_fmt(a, budget) for a in node["args"]]
    if node["op"] == "neg":
        return f"-{args[0]}"
    if node["op"] == "getitem":
        return f"{args[0]}[{node['index']}]"
    return f"({args[0]} {_SYMBOL[node['op']]} {args[1]})"
