"""Messages: the schema of every operation, and request/reply envelopes.

Request header: ``{"op": str, "id": int (1 .. 2**63-1, chosen by the client), **fields}``.
Reply header:   ``{"id": int, "ok": true, **result}`` or
                ``{"id": int, "ok": false, "error": {"code": str, "message": str}}``.
Replies echo the request's id; id 0 in a reply means "about the connection, not one
request" (a frame that could not be read: the server then closes the connection).

Payload tensors are referred to by their index in the frame (a "payload index"). Tensors
kept on the server are referred to by ``tensor_ref`` = ``{"id", "shape", "dtype",
"session_id"}``; a breakpoint by ``paused_ref`` = ``{"paused_id", "layer", "step",
"activation": tensor_ref}``. ``captured`` maps a layer number written as a decimal string
(msgpack map keys must be strings here) to a tensor_ref.

:data:`REQUESTS` and :data:`REPLIES` are the whole protocol: one :class:`Struct` per op,
read top to bottom. Validation returns a normalised copy with defaults filled in, so the
engine sees every field. Errors: a request with a bad envelope (no/unknown op, bad id) is
a ProtocolError; a bad field is an InvalidRequest naming the field; a reply that does not
match its schema is a ProtocolError on the client.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from djinn import errors
from djinn.errors import DjinnError, InvalidRequest, ProtocolError
from djinn.protocol.expr import validate_expr
from djinn.protocol.schema import (
    AnyOf, Bool, Bytes, Check, Ctx, Field, Float, Id, Int, Json, ListOf, MapOf, Null, Nullable,
    Opt, Str, Struct, Tagged, tensor_index,
)
from djinn.protocol.tensors import DTYPES, MAX_NDIM

MAX_TOKENS = 1 << 22
MAX_ERROR_MESSAGE = 8192
PHASES = ("IO_WAIT", "ACTIVE")
FINISH_REASONS = ("stop", "length", "breakpoint", "cancelled")  # stop: EOS, stop string or stop token
FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # no path separators: safe to write in a dir

F = Field
TOKEN = Int(0, 2**31 - 1)
TOKENS = ListOf(TOKEN, MAX_TOKENS)
LAYER = Int(0, 4095)
MODEL = Str(1024, min_len=1)


def _expr(value: Any, path: str, ctx: Ctx) -> Any:
    try:
        validate_expr(value, n_tensors=len(ctx.tensors), path=path)
    except InvalidRequest as exc:
        raise ctx.error(str(exc)) from None
    return value


EXPR = Check(_expr, name="an expression", types=(dict,))

TENSOR_REF = Struct({
    "id": F(Id()),
    "shape": F(ListOf(Int(0, 2**62), MAX_NDIM)),
    "dtype": F(Str(16, choices=tuple(DTYPES))),
    "session_id": F(Id()),
})
PAUSED_REF = Struct({
    "paused_id": F(Id()),
    "layer": F(LAYER),
    "step": F(Int(0, 2**31 - 1)),  # decode step of a paused generate; 0 for forward
    "activation": F(TENSOR_REF),
})
POSITIONS = Opt(Nullable(ListOf(Int(-(2**31), 2**31 - 1), MAX_TOKENS)), None)  # None: every position
INTERVENTION = Tagged("kind", {
    "scale": Struct({"layer": F(LAYER), "factor": F(Float()), "positions": POSITIONS}),
    "add": Struct({"layer": F(LAYER), "vector": F(tensor_index("float")), "positions": POSITIONS}),
})
GENERATE_RESULT = Struct({
    "token_ids": F(TOKENS),
    "text": F(Str()),
    "finish_reason": F(Str(32, choices=FINISH_REASONS)),
    "timings": Opt(MapOf(Str(64), Float(0.0)), {}),  # queue_ms, restore_ms, compute_ms, ...
    "captured": Opt(MapOf(Str(4, pattern=re.compile(r"[0-9]{1,4}")), TENSOR_REF), {}),
    "paused": Opt(Nullable(PAUSED_REF), None),
    # token accounting of the turn (absent from older servers: treat as 0)
    "prompt_tokens": Opt(Int(0, 2**31 - 1)),
    "cached_tokens": Opt(Int(0, 2**31 - 1)),
    "computed_tokens": Opt(Int(0, 2**31 - 1)),
    "session_id": Opt(Id()),
})

REQUESTS: dict[str, Struct] = {
    "hello": Struct({
        "version": F(Int(0, 65535)),  # the protocol version the client speaks
        "token": Opt(Nullable(Str(4096)), None),
        "client": Opt(Str(256), ""),  # e.g. "djinn-python/0.1.0", for logs
        # a random secret the client keeps for its lifetime: on a server without a token it
        # names who owns the sessions, so a reconnecting client gets them back (server/auth.py)
        "client_key": Opt(Nullable(Str(128, min_len=16))),
    }),
    "model_info": Struct({"model": F(MODEL)}),
    "session_open": Struct({
        "model": F(MODEL),
        "session_id": Opt(Nullable(Id()), None),  # resume this id after a reconnect
    }),
    "generate": Struct({
        "session_id": F(Id()),
        "prompt": F(AnyOf(Str(), TOKENS)),  # text (chat-templated when chat) or token ids
        "max_new_tokens": Opt(Int(0, 1 << 20), 32),
        "temperature": Opt(Float(0.0, 100.0), 0.0),  # 0: greedy
        "top_p": Opt(Float(0.0, 1.0, lo_open=True), 1.0),
        "top_k": Opt(Int(0, 2**31 - 1), 0),  # 0: no top-k
        "seed": Opt(Nullable(Int(0, 2**64 - 1)), None),
        "stop": Opt(ListOf(Str(1024, min_len=1), 64), []),
        "stop_token_ids": Opt(ListOf(TOKEN, 1024), []),
        "chat": Opt(Nullable(Bool()), None),  # None: the model's default (chat models: True)
        "ignore_eos": Opt(Bool()),  # absent: False
        "interventions": Opt(ListOf(INTERVENTION, 1024), []),
        "capture": Opt(ListOf(LAYER, 4096, unique=True), []),
        "breakpoint": Opt(Nullable(Struct({"layer": F(LAYER), "step": F(Int(0, 1 << 20))})), None),
    }),
    "signal_phase": Struct({"session_id": F(Id()), "phase": F(Str(16, choices=PHASES))}),
    "forward": Struct({
        "session_id": F(Id()),
        "input_ids": F(AnyOf(ListOf(TOKEN, MAX_TOKENS, min_len=1), tensor_index("int"))),
        "breakpoint": Opt(Nullable(LAYER), None),  # pause after this layer
        "interventions": Opt(ListOf(INTERVENTION, 1024)),  # absent: none
    }),
    "resume": Struct({
        "paused_id": F(Id()),
        "activation": Opt(AnyOf(Null(), tensor_index("float"), EXPR), None),  # None: unmodified
    }),
    "fetch": Struct({
        "tensor_id": F(Id()),
        "expr": Opt(Nullable(EXPR), None),  # when given, its value is returned instead
    }),
    "release": Struct({"tensor_id": F(Id())}),
    "fork": Struct({"session_id": F(Id())}),
    "close": Struct({"session_id": F(Id())}),
    "stats": Struct({}),
    "cancel": Struct({"target_id": F(Int(1, 2**63 - 1))}),  # the id of a request in flight
    "session_info": Struct({"session_id": F(Id())}),
    # the payload tensors sent straight back, no engine involved: a health check and the
    # benchmark of the transport itself (djinn bench protocol)
    "echo": Struct({"data": Opt(ListOf(tensor_index(), 1024))}),
}

REPLIES: dict[str, Struct] = {
    "hello": Struct({
        "server_version": F(Str(64)),
        "protocol_version": F(Int(0, 65535)),
        "models": F(ListOf(MODEL, 1024)),
        "max_message_bytes": Opt(Int(1, 2**63 - 1)),  # the server's frame limit, for early errors
    }),
    "model_info": Struct({
        "name": F(MODEL),
        "config": F(Json()),  # the transformers config as a dict
        "num_layers": F(Int(0, 4096)),
        "is_chat": F(Bool()),
        "tokenizer": F(Struct({"files": F(MapOf(Str(128, pattern=FILENAME), Bytes(), 64))})),
    }),
    "session_open": Struct({"session_id": F(Id())}),
    "generate": GENERATE_RESULT,
    "signal_phase": Struct({}),
    "forward": Struct({"paused": Opt(PAUSED_REF), "logits": Opt(TENSOR_REF)},
                      exactly_one=("paused", "logits")),
    "resume": Struct({  # a forward's resume: logits, or paused at a later breakpoint;
        "logits": Opt(TENSOR_REF),  # a generate's resume: generation (which may pause again)
        "paused": Opt(Nullable(PAUSED_REF), None),
        "generation": Opt(GENERATE_RESULT),
    }, at_least_one=("logits", "paused", "generation")),
    "fetch": Struct({"tensor": F(tensor_index())}),
    "release": Struct({}),
    # the child session; when the parent was paused at a breakpoint, the child's paused forward
    "fork": Struct({"session_id": F(Id()), "paused": Opt(Nullable(PAUSED_REF), None)}),
    "close": Struct({}),
    "stats": Struct({"stats": F(Json())}),  # memory by segment, sessions by phase, swaps, ...
    "cancel": Struct({"cancelled": Opt(Bool())}),  # False: nothing in flight had that id
    "session_info": Struct({"info": F(Json())}),  # phase, tokens, KV blocks and where they live
    "echo": Struct({"data": Opt(ListOf(tensor_index(), 1024))}),
}

ERROR = Struct({"code": F(Str(64)), "message": F(Str(MAX_ERROR_MESSAGE))})
REQUEST_ID = Int(1, 2**63 - 1)
REPLY_ID = Int(0, 2**63 - 1)


def request_id(header: Any) -> int:
    """The header's request id if it is a valid one, else 0 (for replying to a bad frame)."""
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if type(rid) is int and 1 <= rid < 2**63 else 0


def validate_request(header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
    """Check a request against its op's schema; returns it normalised (defaults filled in)."""
    if not isinstance(header, dict):
        raise ProtocolError(f"a request header must be a map, got {type(header).__name__}")
    op = header.get("op")
    if type(op) is not str or op not in REQUESTS:
        raise ProtocolError(f"unknown op {op!r:.60}; protocol ops: {', '.join(REQUESTS)}")
    rid = REQUEST_ID.check(header.get("id"), f"{op}.id", Ctx(error=ProtocolError))
    body = {k: v for k, v in header.items() if k not in ("op", "id")}
    return {"op": op, "id": rid, **REQUESTS[op].check(body, op, Ctx(tensors, InvalidRequest))}


def validate_reply(op: str, header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
    """Check a reply to ``op``; returns it normalised. A failed reply keeps its ``error``."""
    if op not in REPLIES:
        raise ProtocolError(f"unknown op {op!r}; protocol ops: {', '.join(REPLIES)}")
    ctx = Ctx(tensors, ProtocolError)
    if not isinstance(header, dict):
        raise ProtocolError(f"a reply header must be a map, got {type(header).__name__}")
    rid = REPLY_ID.check(header.get("id"), f"{op} reply.id", ctx)
    ok = Bool().check(header.get("ok"), f"{op} reply.ok", ctx)
    body = {k: v for k, v in header.items() if k not in ("id", "ok")}
    schema = REPLIES[op] if ok else Struct({"error": F(ERROR)})
    return {"id": rid, "ok": ok, **schema.check(body, f"{op} reply", ctx)}


def make_request(op: str, request_id: int, **fields: Any) -> dict[str, Any]:
    return {"op": op, "id": request_id, **fields}


def ok_reply(request_id: int, **result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, **result}


def error_reply(request_id: int, exc: BaseException) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": error_to_wire(exc)}


def error_to_wire(exc: BaseException) -> dict[str, str]:
    """``{"code", "message"}`` for an exception. Djinn's typed errors keep their code; an
    out-of-memory becomes "capacity"; anything else is an internal error (code djinn_error)."""
    if isinstance(exc, DjinnError):
        code, message = exc.code, str(exc)
    elif isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        code, message = errors.CapacityError.code, f"out of memory on the server: {exc}"
    else:
        code, message = errors.DjinnError.code, f"internal server error: {type(exc).__name__}: {exc}"
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE - 3] + "..."
    return {"code": code, "message": message}


def error_from_wire(error: dict[str, Any]) -> DjinnError:
    """The typed exception for a reply's ``error`` map (unknown codes become DjinnError)."""
    checked = ERROR.check(error, "error", Ctx(error=ProtocolError))
    return errors.error_from_code(checked["code"], checked["message"])
