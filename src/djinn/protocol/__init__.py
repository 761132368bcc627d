"""Djinn's native wire protocol: versioned frames, typed messages, raw tensors, no pickle.

Why a protocol of our own. A request or reply is a small structured header next to
possibly large tensors (a hidden state, logits, a steering vector). JSON or gRPC would
base64 or re-serialise the tensors; pickle would execute code from the peer (principle 9
forbids it). So a frame is a fixed 16-byte prefix, a msgpack header, and the tensors' raw
bytes::

    b"DJ" | version u8 | flags u8 | header_len u32 | payload_len u64 | msgpack map | payload

(little-endian; see :mod:`.frames`). The header lists the tensors as ``{"dtype", "shape",
"nbytes"}`` in payload order; each tensor starts at a multiple of 8 bytes so it can be
viewed in place. msgpack is plain data only: strings must be UTF-8, map keys strings, ext
types (timestamps included) are rejected, every length is bounded by the header's size.
The prefix is checked before anything else is read: magic, version, flags, and the
message size against a limit (default 256 MiB), so an oversized frame is refused after 16
bytes, before any allocation. Tensors come from a closed set of ten dtypes
(:mod:`.tensors`); each descriptor must agree with its shape, dtype and the payload size.

Transport: asyncio streams (:func:`read_message`, :func:`write_message`) and plain blocking
sockets, as in the synchronous client (:func:`recv_message`, :func:`send_message`); all
speak the same frames (:func:`encode_message` is shared). The server reads and writes with
its event loop on non-blocking sockets (``djinn/server/wire.py``: ``sock_recv_into`` and
:func:`~djinn.protocol.frames.sock_sendmsg_all`) on the same checks, which saves the
StreamReader's extra copy.

Messages (:mod:`.messages`): a request is ``{"op", "id", **fields}``, a reply ``{"id",
"ok", **result}`` or ``{"id", "ok": false, "error": {"code", "message"}}``; one
declarative schema per op, unknown fields rejected by name. Errors cross the wire as their
``djinn.errors`` code and come back as the same class (:func:`error_to_wire`,
:func:`error_from_wire`). Lazy remote-tensor arithmetic (``p.activation * 0.9``) travels
as a closed-vocabulary expression tree (:mod:`.expr`).

Copies of a 64 MB tensor, per side (beyond the kernel's own socket copies):
- sending, blocking socket or the server's event loop: none. ``sendmsg`` gathers [prefix,
  header, tensor memory...] in one call while the socket has room.
- sending, asyncio streams, Python >= 3.12: none (``writelines`` keeps memoryviews and uses
  ``sendmsg``). Python 3.11: at most one, when the transport buffers what the kernel did
  not take at once (we write in 1 MiB pieces; 3.11's ``writelines`` would join all first).
- receiving, blocking socket or the server's event loop: none. ``recv_into`` fills one
  payload buffer (``frames.payload_buffer``: allocated without a zero fill, as every byte
  is received into it) and the tensors are ``torch.frombuffer`` views of it (writable).
- receiving, asyncio streams: one into the payload buffer (StreamReader has no readinto;
  its pieces of a few hundred KiB pass through its own small buffer on the way).
- non-contiguous or device tensors are made contiguous / moved to the CPU first (one copy,
  the sender's); a tensor is copied on receipt only if its address were misaligned.
"""

from djinn.protocol.expr import Expr, UnsupportedOperation, evaluate_expr, validate_expr
from djinn.protocol.frames import (
    DEFAULT_MAX_BYTES,
    MAGIC,
    PREFIX_SIZE,
    PROTOCOL_VERSION,
    ConnectionClosed,
    Message,
    decode_frame,
    encode_message,
    read_message,
    recv_message,
    send_message,
    write_message,
)
from djinn.protocol.messages import (
    REPLIES,
    REQUESTS,
    error_from_wire,
    error_reply,
    error_to_wire,
    make_request,
    ok_reply,
    request_id,
    validate_reply,
    validate_request,
)
from djinn.protocol.tensors import DTYPES

__all__ = [
    "DEFAULT_MAX_BYTES", "DTYPES", "MAGIC", "PREFIX_SIZE", "PROTOCOL_VERSION", "REPLIES", "REQUESTS",
    "ConnectionClosed", "Expr", "Message", "UnsupportedOperation",
    "decode_frame", "encode_message", "error_from_wire", "error_reply", "error_to_wire",
    "evaluate_expr", "make_request", "ok_reply", "read_message", "recv_message", "request_id",
    "send_message", "validate_expr", "validate_reply", "validate_request", "write_message",
]
