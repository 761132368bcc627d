"""Small declarative validators for message headers.

A message schema is a :class:`Struct` of named :class:`Field` s, each holding a spec
(:class:`Int`, :class:`Str`, :class:`ListOf`, ...). ``spec.check(value, path, ctx)`` returns
the normalised value (defaults filled in, ints widened to float where a float is expected)
or raises ``ctx.error`` with the dotted path of the offending field, e.g.
``generate.interventions[0].factor: expected a number, got str``. Unknown fields are
rejected by name. Validation is strict: bool is not an int, and nothing is coerced from
strings. Specs only see plain data (what msgpack decodes to), never arbitrary objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from djinn.errors import DjinnError, InvalidRequest

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_MISSING = object()


@dataclass
class Ctx:
    """What a check needs besides the value: the frame's tensors and which error to raise
    (InvalidRequest for requests the server receives, ProtocolError for replies)."""

    tensors: Sequence[torch.Tensor] = ()
    error: type[DjinnError] = InvalidRequest

    def fail(self, path: str, message: str) -> DjinnError:
        return self.error(f"{path}: {message}")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


class Spec(ABC):
    """A field's validator: ``check`` returns the value (defaults filled in) or raises via ``ctx``."""

    name = "value"
    types: tuple[type, ...] = ()

    @abstractmethod
    def check(self, value: Any, path: str, ctx: Ctx) -> Any: ...

    def _type(self, value: Any, path: str, ctx: Ctx) -> None:
        if type(value) not in self.types:  # exact types: bool is not accepted as an int
            raise ctx.fail(path, f"expected {self.name}, got {_show(value)}")


@dataclass
class Int(Spec):
    lo: int = -(2**63)
    hi: int = 2**63 - 1
    name = "an int"
    types = (int,)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        if not self.lo <= value <= self.hi:
            raise ctx.fail(path, f"{value} is out of range [{self.lo}, {self.hi}]")
        return value


@dataclass
class Float(Spec):
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    name = "a finite number"
    types = (float, int)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        value = float(value)
        if not math.isfinite(value):
            raise ctx.fail(path, f"{value} is not a finite number")
        if not self.lo <= value <= self.hi or (self.lo_open and value == self.lo):
            lo = "(" if self.lo_open else "["
            raise ctx.fail(path, f"{value} is out of range {lo}{self.lo}, {self.hi}]")
        return value


class Bool(Spec):
    name = "a bool"
    types = (bool,)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        return value


@dataclass
class Str(Spec):
    max_len: int = 1 << 24
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern | None = None
    min_len: int = 0
    name = "a string"
    types = (str,)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        if not self.min_len <= len(value) <= self.max_len:
            raise ctx.fail(path, f"string of {len(value)} characters; expected {self.min_len} to {self.max_len}")
        if self.choices is not None and value not in self.choices:
            raise ctx.fail(path, f"{value[:60]!r} is not one of {', '.join(self.choices)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ctx.fail(path, f"{value[:60]!r} does not match {self.pattern.pattern}")
        return value


def Id() -> Str:  # noqa: N802 - reads like the other specs
    """A session, tensor or paused-state id: 1-128 of [A-Za-z0-9_.:-], not starting with a sign."""
    return Str(128, pattern=ID_PATTERN)


@dataclass
class Bytes(Spec):
    max_len: int = 1 << 26
    name = "bytes"
    types = (bytes,)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        if len(value) > self.max_len:
            raise ctx.fail(path, f"{len(value)} bytes is more than {self.max_len}")
        return value


class Null(Spec):
    name = "None"
    types = (type(None),)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        return None


class AnyOf(Spec):
    """One of several specs, chosen by the value's type (each spec declares its types)."""

    def __init__(self, *options: Spec):
        self.options = options
        self.name = " or ".join(o.name for o in options)
        self.types = tuple(t for o in options for t in o.types)

    def check(self, value, path, ctx):
        for option in self.options:
            if type(value) in option.types:
                return option.check(value, path, ctx)
        raise ctx.fail(path, f"expected {self.name}, got {_show(value)}")


def Nullable(spec: Spec) -> AnyOf:  # noqa: N802
    return AnyOf(Null(), spec)


@dataclass
class ListOf(Spec):
    item: Spec
    max_len: int = 1 << 22
    min_len: int = 0
    unique: bool = False
    name = "a list"
    types = (list,)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        if not self.min_len <= len(value) <= self.max_len:
            raise ctx.fail(path, f"list of {len(value)} items; expected {self.min_len} to {self.max_len}")
        item = self.item
        if type(item) is Int and not self.unique and value and all(type(v) is int for v in value) \
                and item.lo <= min(value) and max(value) <= item.hi:
            return list(value)  # fast path for token lists (100k+ items); else find the bad one below
        out = [self.item.check(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
        if self.unique and len(set(out)) != len(out):
            raise ctx.fail(path, "items must be distinct")
        return out


@dataclass
class MapOf(Spec):
    key: Str
    value: Spec
    max_len: int = 4096
    name = "a map"
    types = (dict,)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        if len(value) > self.max_len:
            raise ctx.fail(path, f"map of {len(value)} entries; at most {self.max_len}")
        return {self.key.check(k, f"{path} key", ctx): self.value.check(v, f"{path}[{k!r}]", ctx)
                for k, v in value.items()}


class Json(Spec):
    """Free-form JSON-able data (configs, stats): plain types, str keys, bounded nesting."""

    name = "JSON-able data"
    types = (dict, list, str, int, float, bool, type(None))

    def __init__(self, max_depth: int = 32, top: tuple[type, ...] = (dict,)):
        self.max_depth, self.top = max_depth, top

    def check(self, value, path, ctx):
        if type(value) not in self.top:
            raise ctx.fail(path, f"expected a map, got {_show(value)}")
        stack = [(value, 1)]
        while stack:  # iterative: the header may nest up to msgpack's 1024 levels
            v, depth = stack.pop()
            if type(v) in (dict, list):
                if depth > self.max_depth:
                    raise ctx.fail(path, f"nests deeper than {self.max_depth} levels")
                if type(v) is dict:
                    if any(type(k) is not str for k in v):
                        raise ctx.fail(path, "map keys must be strings")
                    v = v.values()
                stack.extend((x, depth + 1) for x in v)
            elif type(v) not in self.types:
                raise ctx.fail(path, f"holds {_show(v)}, which is not JSON-able")
        return value


@dataclass
class Check(Spec):
    """A spec given by a function ``fn(value, path, ctx) -> value`` (tensor indices, exprs)."""

    fn: Callable[[Any, str, Ctx], Any]
    name: str = "value"
    types: tuple[type, ...] = (object,)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        return self.fn(value, path, ctx)


@dataclass
class Field:
    spec: Spec
    required: bool = True
    default: Any = _MISSING

    def __post_init__(self):
        if self.default is not _MISSING:
            self.required = False


def Opt(spec: Spec, default: Any = _MISSING) -> Field:  # noqa: N802
    """An optional field; absent fields take ``default`` (absent stays absent without one)."""
    return Field(spec, required=False, default=default)


@dataclass
class Struct(Spec):
    """A map with a fixed set of named fields; unknown fields are errors."""

    fields: dict[str, Field]
    exactly_one: tuple[str, ...] = ()
    at_least_one: tuple[str, ...] = ()
    name = "a map"
    types = (dict,)
    extra: Callable[[dict, str, Ctx], None] | None = field(default=None)

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise ctx.fail(path, f"unknown field {unknown[0]!r}; allowed: {', '.join(self.fields) or 'none'}")
        out = {}
        for key, f in self.fields.items():
            if key in value:
                out[key] = f.spec.check(value[key], f"{path}.{key}", ctx)
            elif f.required:
                raise ctx.fail(path, f"missing required field {key!r}")
            elif f.default is not _MISSING:
                out[key] = list(f.default) if isinstance(f.default, list) else f.default
        present = [k for k in self.exactly_one if out.get(k) is not None]
        if self.exactly_one and len(present) != 1:
            raise ctx.fail(path, f"exactly one of {', '.join(self.exactly_one)} must be given, got {present or 'none'}")
        if self.at_least_one and not any(out.get(k) is not None for k in self.at_least_one):
            raise ctx.fail(path, f"at least one of {', '.join(self.at_least_one)} must be given")
        if self.extra is not None:
            self.extra(out, path, ctx)
        return out


class Tagged(Spec):
    """A map whose ``tag`` field picks the Struct that validates the rest."""

    name = "a map"
    types = (dict,)

    def __init__(self, tag: str, variants: dict[str, Struct]):
        self.tag, self.variants = tag, variants

    def check(self, value, path, ctx):
        self._type(value, path, ctx)
        kind = value.get(self.tag)
        if type(kind) is not str or kind not in self.variants:
            raise ctx.fail(f"{path}.{self.tag}", f"expected one of {', '.join(self.variants)}, got {_show(kind)}")
        rest = {k: v for k, v in value.items() if k != self.tag}
        return {self.tag: kind, **self.variants[kind].check(rest, path, ctx)}


def tensor_index(kind: str | None = None) -> Check:
    """A payload index; ``kind`` "float" or "int" also checks the tensor's dtype family."""

    def fn(value, path, ctx):
        if not 0 <= value < len(ctx.tensors):
            raise ctx.fail(path, f"tensor index {value} but the frame carries {len(ctx.tensors)} tensors")
        dtype = ctx.tensors[value].dtype
        if kind == "float" and not dtype.is_floating_point:
            raise ctx.fail(path, f"expected a floating-point tensor, got {dtype}")
        if kind == "int" and (dtype.is_floating_point or dtype == torch.bool):
            raise ctx.fail(path, f"expected an integer tensor, got {dtype}")
        return value

    return Check(fn, name="a payload tensor index", types=(int,))
