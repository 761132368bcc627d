"""A raw-socket peer for server tests: sends exactly the bytes a test wants (well-formed
frames through djinn.protocol, or garbage) and reads what comes back."""

from __future__ import annotations

import socket
import struct

import msgpack

from djinn.errors import ProtocolError
from djinn.protocol import PROTOCOL_VERSION, recv_message, send_message

TIMEOUT = 15.0
PREFIX = struct.Struct("<2sBBIQ")


def frame(header: dict, tensors=()) -> bytes:
    from djinn.protocol import encode_message

    return b"".join(bytes(p) for p in encode_message(header, tensors))


def raw_frame(header: dict, payload: bytes = b"", version: int = PROTOCOL_VERSION, payload_len: int | None = None) -> bytes:
    """A frame built by hand, so it can be wrong in ways encode_message refuses to be."""
    head = msgpack.packb(header, use_bin_type=True)
    plen = len(payload) if payload_len is None else payload_len
    return PREFIX.pack(b"DJ", version, 0, len(head), plen) + head + payload


class Peer:
    def __init__(self, host_port: tuple[str, int]):
        self.sock = socket.create_connection(host_port, timeout=TIMEOUT)
        self.ids = iter(range(1, 1 << 30))

    def hello(self, token: str | None, **extra) -> dict:
        return self.request("hello", version=PROTOCOL_VERSION, token=token, **extra)

    def request(self, op: str, tensors=(), **fields) -> dict:
        rid = next(self.ids)
        send_message(self.sock, {"op": op, "id": rid, **fields}, tensors)
        return self.reply()

    def send(self, data: bytes, eof: bool = False) -> None:
        self.sock.sendall(data)
        if eof:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:   # the server already judged the frame and closed: that is its answer
                pass

    def reply(self) -> dict:
        msg = recv_message(self.sock)
        return msg.header

    def closed_by_server(self) -> bool:
        """True when the server hung up (after at most one more error frame)."""
        try:
            while True:
                recv_message(self.sock)
        except TimeoutError:
            return False
        except (ProtocolError, OSError):   # ConnectionClosed included
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
