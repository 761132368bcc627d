"""Frames: the byte layout of one message, and reading/writing it on a stream.

A frame is a 16-byte prefix, a msgpack header, and a payload of raw tensor bytes::

    offset  size  field
    0       2     magic        b"DJ"
    2       1     version      u8, PROTOCOL_VERSION (1)
    3       1     flags        u8, must be 0 in version 1 (reserved, e.g. for compression)
    4       4     header_len   u32 little-endian, bytes of msgpack header (> 0)
    8       8     payload_len  u64 little-endian, bytes of payload

The header is one msgpack map with str keys. The frame layer owns its key ``"tensors"``:
the list of tensor descriptors in payload order (absent when there are none); the rest of
the map is the message (``Message.header``), validated by :mod:`djinn.protocol.messages`.

Reading checks, in this order, before allocating or reading anything it does not have to:
magic, version, flags, then ``header_len <= max_header_bytes`` and
``header_len + payload_len <= max_bytes`` (from the prefix alone, so an oversized frame
costs 16 bytes of reading), then the header (msgpack with every size limit set, strings
as UTF-8, str map keys only, no ext types at all: it decodes to plain data only), then the
descriptors, whose padded sizes must add up to ``payload_len`` exactly; only then is the
payload buffer allocated and read. A server should read a connection's first frame (the
``hello`` that carries the token) with a small ``max_bytes``, so an unauthenticated peer
cannot make it allocate a full-size payload.

Every malformed input raises :class:`~djinn.errors.ProtocolError`; end of stream raises
:class:`ConnectionClosed` (a ProtocolError), ``clean`` when it fell between frames. A
timeout the caller set on its socket surfaces as ``TimeoutError``; after any error the
stream position is unknown and the connection must be closed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np
import torch

from djinn.errors import ProtocolError
from djinn.protocol import tensors as tcodec

PREFIX = struct.Struct("<2sBBIQ")
PREFIX_SIZE = PREFIX.size  # 16
MAGIC = b"DJ"
PROTOCOL_VERSION = 1
DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_MAX_HEADER_BYTES = 64 * 2**20  # a large tokenizer.json travels in model_info's header
TENSORS_KEY = "tensors"
_IOV_BATCH = 512  # below IOV_MAX (1024 on Linux)
_WRITE_CHUNK = 1 << 20
# 3.12 made writelines gather memoryviews into sendmsg; 3.11's joins them into one bytes first
_WRITELINES_GATHERS = sys.version_info >= (3, 12)


@dataclass
class Message:
    """One decoded frame: the header map (without ``"tensors"``) and the payload tensors."""

    header: dict[str, Any]
    tensors: list[torch.Tensor] = field(default_factory=list)


class ConnectionClosed(ProtocolError):
    """The peer closed the connection; ``clean`` when no frame was cut short."""

    def __init__(self, message: str, clean: bool = False):
        super().__init__(message)
        self.clean = clean


# ---------------------------------------------------------------- encoding

def encode_message(header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> list[Any]:
    """The frame as a list of buffers: prefix, header, then each tensor's own memory.

    Tensor buffers are zero-copy views (see :mod:`djinn.protocol.tensors`); the list is
    meant for ``sendmsg``/``writelines`` so big tensors are never concatenated."""
    if not isinstance(header, dict):
        raise ProtocolError(f"a message header must be a dict, got {type(header).__name__}")
    if TENSORS_KEY in header:
        raise ProtocolError(f"header key {TENSORS_KEY!r} is reserved for the frame's tensor list")
    if len(tensors) > tcodec.MAX_TENSORS:
        raise ProtocolError(f"{len(tensors)} tensors in one message; at most {tcodec.MAX_TENSORS}")
    prepared = [tcodec.prepare_tensor(t) for t in tensors]
    descs = [tcodec.describe(t) for t in prepared]
    full = {**header, TENSORS_KEY: descs} if descs else header
    try:
        head = msgpack.packb(full, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"header cannot be encoded (only None, bool, int, float, str, bytes, "
                            f"list and dict are allowed): {exc}") from None
    pieces: list[Any] = [b"", head]
    payload_len = 0
    for t, d in zip(prepared, descs):
        if d["nbytes"]:
            pieces.append(tcodec.tensor_buffer(t))
        pad = tcodec.padded(d["nbytes"]) - d["nbytes"]
        if pad:
            pieces.append(bytes(pad))
        payload_len += d["nbytes"] + pad
    if len(head) > 0xFFFFFFFF:
        raise ProtocolError(f"header of {len(head)} bytes does not fit the u32 length field")
    pieces[0] = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(head), payload_len)
    return pieces


# ---------------------------------------------------------------- decoding

def parse_prefix(prefix: bytes, max_bytes: int, max_header_bytes: int) -> tuple[int, int]:
    """Check the 16-byte prefix; returns (header_len, payload_len)."""
    magic, version, flags, header_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        hint = ""
        if prefix[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI"):
            hint = " (an HTTP request: the OpenAI-compatible API listens on --http-port)"
        elif prefix[:1] == b"\x16":
            hint = " (a TLS handshake: Djinn's native protocol is not TLS)"
        raise ProtocolError(f"not a Djinn frame: bad magic {bytes(prefix[:4])!r}{hint}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks protocol version {version}, this side speaks "
                            f"{PROTOCOL_VERSION}; install matching djinn versions")
    if flags:
        raise ProtocolError(f"unknown frame flags 0x{flags:02x} (version {PROTOCOL_VERSION} defines none)")
    if header_len == 0:
        raise ProtocolError("frame has an empty header; the header must be a msgpack map")
    limit = min(max_header_bytes, max_bytes)
    if header_len > limit:
        raise ProtocolError(f"header of {header_len} bytes exceeds the limit of {limit} bytes")
    if header_len + payload_len > max_bytes:
        raise ProtocolError(f"message of {header_len + payload_len} bytes exceeds the limit of "
                            f"{max_bytes} bytes; send smaller tensors or raise the server's limit")
    return header_len, payload_len


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed in a header")


def _str_keys(obj: dict) -> dict:
    # strict_map_key still lets bytes keys through; the protocol's maps are keyed by str
    for key in obj:
        if type(key) is not str:
            raise ProtocolError(f"header map keys must be strings, got {type(key).__name__}")
    return obj


def decode_header(data: bytes, payload_len: int, max_bytes: int) -> tuple[dict[str, Any], list[tuple]]:
    """Decode and check the header; returns (message header, tensor specs (dtype, shape, nbytes))."""
    n = len(data)
    try:
        header = msgpack.unpackb(
            data, raw=False, strict_map_key=True, object_hook=_str_keys, ext_hook=_reject_ext,
            use_list=True, max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2,
            max_ext_len=0)  # 0 also rejects the built-in timestamp extension, which skips ext_hook
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises ValueError, UnicodeDecodeError, StackError...
        if "max_ext_len" in str(exc):
            raise ProtocolError("msgpack extension types (timestamps included) are not allowed "
                                "in a header") from None
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    descs = header.pop(TENSORS_KEY, [])
    if not isinstance(descs, list) or len(descs) > tcodec.MAX_TENSORS:
        raise ProtocolError(f"{TENSORS_KEY!r} must be a list of at most {tcodec.MAX_TENSORS} descriptors")
    specs = [tcodec.check_descriptor(d, i, max_bytes) for i, d in enumerate(descs)]
    expected = sum(tcodec.padded(s[2]) for s in specs)
    if expected != payload_len:
        raise ProtocolError(f"payload_len is {payload_len} but the tensor descriptors need {expected} bytes")
    return header, specs


def payload_buffer(nbytes: int) -> memoryview:
    """A writable buffer for a payload of ``nbytes`` that a receive fills in place.

    Not zero-filled, unlike ``bytearray(n)``: a frame's payload is used only once every byte
    of it was received. On the 2-core CPU machine the zero fill cost 0.16 ms per 4 MiB and a
    fresh 64 MiB ``bytearray`` 30 ms (numpy's allocation asks the kernel for huge pages)."""
    return memoryview(np.empty(nbytes, dtype=np.uint8))


def build_tensors(payload: bytearray | memoryview, specs: list[tuple]) -> list[torch.Tensor]:
    """Tensors viewing ``payload`` (a writable buffer) in place; checks that padding bytes are zero."""
    out, pos = [], 0
    for i, (dtype, shape, nbytes) in enumerate(specs):
        out.append(tcodec.tensor_from_payload(payload, pos, dtype, shape, nbytes, i))
        end = pos + tcodec.padded(nbytes)
        if any(payload[pos + nbytes:end]):
            raise ProtocolError(f"tensors[{i}]: non-zero padding after its bytes")
        pos = end
    return out


def decode_frame(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Message:
    """Decode one complete frame held in memory (copies the payload once)."""
    if len(data) < PREFIX_SIZE:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    hlen, plen = parse_prefix(data[:PREFIX_SIZE], max_bytes, max_header_bytes)
    if len(data) != PREFIX_SIZE + hlen + plen:
        raise ProtocolError(f"frame is {len(data)} bytes but its prefix says {PREFIX_SIZE + hlen + plen}")
    header, specs = decode_header(data[PREFIX_SIZE:PREFIX_SIZE + hlen], plen, max_bytes)
    return Message(header, build_tensors(bytearray(memoryview(data)[PREFIX_SIZE + hlen:]), specs))


# ---------------------------------------------------------------- asyncio streams

async def _read_into(reader: asyncio.StreamReader, buf: bytearray | memoryview, what: str, at_boundary: bool = False) -> None:
    # StreamReader has no readinto: each read() hands back what is buffered (a few hundred
    # KiB, cache-hot), which is copied into its final place in ``buf``.
    view, pos, n = memoryview(buf), 0, len(buf)
    try:
        while pos < n:
            chunk = await reader.read(n - pos)
            if not chunk:
                if at_boundary and pos == 0:
                    raise ConnectionClosed("peer closed the connection", clean=True)
                raise ConnectionClosed(f"connection closed mid-frame: got {pos} of {n} {what} bytes")
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, TimeoutError):
            raise
        raise ConnectionClosed(f"connection lost while reading the {what}: {exc}") from None


async def read_message(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_BYTES, *,
                       max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Message:
    """Read one frame from an asyncio stream (see the module docstring for the checks)."""
    prefix = bytearray(PREFIX_SIZE)
    await _read_into(reader, prefix, "prefix", at_boundary=True)
    hlen, plen = parse_prefix(prefix, max_bytes, max_header_bytes)
    head = bytearray(hlen)
    await _read_into(reader, head, "header")
    header, specs = decode_header(head, plen, max_bytes)
    payload = payload_buffer(plen)
    await _read_into(reader, payload, "payload")
    return Message(header, build_tensors(payload, specs))


async def write_message(writer: asyncio.StreamWriter, header: dict[str, Any],
                        tensors: Sequence[torch.Tensor] = ()) -> None:
    """Write one frame and drain. Tensors must not be modified in place afterwards: on
    Python >= 3.12 the transport may still hold zero-copy views of their tails."""
    pieces = encode_message(header, tensors)
    try:
        if _WRITELINES_GATHERS:
            writer.writelines(pieces)  # sendmsg of memoryviews, no concatenation
        else:
            # write chunk by chunk instead: the transport copies only what the kernel did
            # not take at once (one copy at most), and its buffer stays ~1 MiB
            for piece in pieces:
                view = memoryview(piece).cast("B")
                for start in range(0, len(view), _WRITE_CHUNK):
                    writer.write(view[start:start + _WRITE_CHUNK])
                    await writer.drain()
        await writer.drain()
    except (ConnectionError, OSError) as exc:
        raise ConnectionClosed(f"connection lost while sending: {exc}") from None


# ---------------------------------------------------------------- blocking sockets

def _recv_into(sock: socket.socket, buf: bytearray | memoryview, what: str, at_boundary: bool = False) -> None:
    view, pos, n = memoryview(buf), 0, len(buf)
    try:
        while pos < n:
            got = sock.recv_into(view[pos:], n - pos)  # straight into the final buffer
            if got == 0:
                if at_boundary and pos == 0:
                    raise ConnectionClosed("peer closed the connection", clean=True)
                raise ConnectionClosed(f"connection closed mid-frame: got {pos} of {n} {what} bytes")
            pos += got
    except TimeoutError:
        raise
    except OSError as exc:
        raise ConnectionClosed(f"connection lost while reading the {what}: {exc}") from None


def recv_message(sock: socket.socket, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Message:
    """Read one frame from a blocking socket; tensors view the received buffer (no copy)."""
    prefix = bytearray(PREFIX_SIZE)
    _recv_into(sock, prefix, "prefix", at_boundary=True)
    hlen, plen = parse_prefix(prefix, max_bytes, max_header_bytes)
    head = bytearray(hlen)
    _recv_into(sock, head, "header")
    header, specs = decode_header(head, plen, max_bytes)
    payload = payload_buffer(plen)
    _recv_into(sock, payload, "payload")
    return Message(header, build_tensors(payload, specs))


def _byte_views(pieces: Sequence[Any]) -> list[memoryview]:
    views = [memoryview(p).cast("B") for p in pieces]
    return [v for v in views if len(v)]


def _advance(views: list[memoryview], i: int, sent: int) -> int:
    """Account ``sent`` bytes of a ``sendmsg`` of ``views[i:]``; returns the first view not fully
    sent (trimmed to its unsent tail)."""
    while sent and i < len(views):
        if sent >= len(views[i]):
            sent -= len(views[i])
            i += 1
        else:
            views[i], sent = views[i][sent:], 0
    return i


def send_message(sock: socket.socket, header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> None:
    """Send one frame with ``sendmsg`` (scatter/gather: the tensors' memory is not copied)."""
    views = _byte_views(encode_message(header, tensors))
    try:
        if not hasattr(sock, "sendmsg"):
            for v in views:
                sock.sendall(v)
            return
        i = 0
        while i < len(views):
            i = _advance(views, i, sock.sendmsg(views[i:i + _IOV_BATCH]))
    except TimeoutError:
        raise
    except OSError as exc:
        raise ConnectionClosed(f"connection lost while sending: {exc}") from None


# ---------------------------------------------------------------- non-blocking sockets (an event loop's)

async def sock_sendmsg_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, pieces: Sequence[Any]) -> None:
    """Send every byte of ``pieces`` on a non-blocking socket: ``sendmsg`` gathers all of them
    (prefix, header and each tensor's own memory, not copied or joined) in one call while the
    socket takes them, and the loop waits for room in between. The pieces must not change
    until it returns. OSError (ValueError once the socket is closed) is the caller's."""
    views = _byte_views(pieces)
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i:i + _IOV_BATCH])
        except (BlockingIOError, InterruptedError):
            await _writable(loop, sock)
            continue
        i = _advance(views, i, sent)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()
    # the callback can run again before the waiting task does: set the result once
    loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_writer(fd)
