"""Example messages for every op, and small helpers to push bytes through real sockets."""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import threading
from dataclasses import dataclass, field

import torch

from djinn.protocol import Expr, frames

CASES: collections.Counter = collections.Counter()
FUZZ_SCALE = max(1, int(os.environ.get("DJINN_FUZZ", "1")))


def cases(n: int) -> int:
    """max_examples for a fuzz test: ``n`` in CI, ``n * DJINN_FUZZ`` when exploring."""
    return n * FUZZ_SCALE
TIMEOUT = 10.0  # no test may block longer than this on a socket


def count_case(name: str) -> None:
    """Call once per hypothesis example, so the run prints how many cases it tried."""
    CASES[name] += 1


@dataclass
class Example:
    op: str
    request: dict
    reply: dict
    request_tensors: list = field(default_factory=list)
    reply_tensors: list = field(default_factory=list)


def _ref(tid: str, shape=(1, 3, 8), dtype="float32") -> dict:
    return {"id": tid, "shape": list(shape), "dtype": dtype, "session_id": "s1"}


def _paused(layer=2, step=0) -> dict:
    return {"paused_id": "p1", "layer": layer, "step": step, "activation": _ref("t7")}


def examples() -> list[Example]:
    """One request/reply pair per op (several for ops with variants), tensors included."""
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(8, generator=g)
    act = torch.randn(1, 3, 8, generator=g).to(torch.bfloat16)
    tree_tensors: list = []
    tree = ((Expr.ref("t7") * 0.9 + Expr.tensor(vec)) - Expr.ref("t8")[..., None, 0:4:2]).encode(tree_tensors)
    gen_result = {"token_ids": [5, 6, 7], "text": " four", "finish_reason": "length",
                  "timings": {"queue_ms": 0.1, "restore_ms": 0.0, "compute_ms": 12.5},
                  "captured": {"6": _ref("t3"), "12": _ref("t4")}, "paused": None}
    return [
        Example("hello", {"op": "hello", "id": 1, "version": 1, "token": "secret", "client": "djinn-python/0.1"},
                {"id": 1, "ok": True, "server_version": "0.1.0", "protocol_version": 1,
                 "models": ["smollm2-135m", "tiny-llama"], "max_message_bytes": 256 << 20}),
        Example("model_info", {"op": "model_info", "id": 2, "model": "smollm2-135m"},
                {"id": 2, "ok": True, "name": "smollm2-135m",
                 "config": {"hidden_size": 576, "rope_scaling": None, "eos_token_id": [2], "arch": ["Llama"]},
                 "num_layers": 30, "is_chat": True,
                 "tokenizer": {"files": {"tokenizer.json": b'{"model": {}}' * 100, "tokenizer_config.json": b"{}"}}}),
        Example("session_open", {"op": "session_open", "id": 3, "model": "tiny-llama", "session_id": None},
                {"id": 3, "ok": True, "session_id": "s1"}),
        Example("generate", {
            "op": "generate", "id": 4, "session_id": "s1", "prompt": "What is 2+2?", "max_new_tokens": 3,
            "temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 2**64 - 1, "stop": ["\n\n"],
            "stop_token_ids": [2], "chat": True, "capture": [6, 12], "breakpoint": None,
            "interventions": [{"kind": "scale", "layer": 6, "factor": 0.9, "positions": None},
                              {"kind": "add", "layer": 10, "vector": 0, "positions": [0, -1]}]},
            {"id": 4, "ok": True, **gen_result}, [vec]),
        Example("generate", {"op": "generate", "id": 5, "session_id": "s1", "prompt": [1, 2, 3],
                             "breakpoint": {"layer": 2, "step": 1}},
                {"id": 5, "ok": True, **{**gen_result, "finish_reason": "breakpoint", "captured": {},
                                         "paused": _paused(2, 1)}}),
        Example("signal_phase", {"op": "signal_phase", "id": 6, "session_id": "s1", "phase": "IO_WAIT"},
                {"id": 6, "ok": True}),
        Example("forward", {"op": "forward", "id": 7, "session_id": "s1", "input_ids": [1, 2, 3], "breakpoint": 2},
                {"id": 7, "ok": True, "paused": _paused()}),
        Example("forward", {"op": "forward", "id": 8, "session_id": "s1", "input_ids": 0},
                {"id": 8, "ok": True, "logits": _ref("t9", (1, 3, 32000))}, [torch.tensor([[1, 2, 3]])]),
        Example("resume", {"op": "resume", "id": 9, "paused_id": "p1", "activation": None},
                {"id": 9, "ok": True, "logits": _ref("t10")}),
        Example("resume", {"op": "resume", "id": 10, "paused_id": "p1", "activation": 0},
                {"id": 10, "ok": True, "paused": _paused(5)}, [act]),
        Example("resume", {"op": "resume", "id": 11, "paused_id": "p1", "activation": tree},
                {"id": 11, "ok": True, "generation": gen_result}, tree_tensors),
        Example("fetch", {"op": "fetch", "id": 12, "tensor_id": "t7", "expr": None},
                {"id": 12, "ok": True, "tensor": 0}, [], [act]),
        Example("fetch", {"op": "fetch", "id": 13, "tensor_id": "t7", "expr": tree},
                {"id": 13, "ok": True, "tensor": 0}, tree_tensors, [torch.randn(1, 3, 1, 2)]),
        Example("release", {"op": "release", "id": 14, "tensor_id": "t7"}, {"id": 14, "ok": True}),
        Example("fork", {"op": "fork", "id": 15, "session_id": "s1"}, {"id": 15, "ok": True, "session_id": "s2"}),
        Example("close", {"op": "close", "id": 16, "session_id": "s2"},
                {"id": 16, "ok": False, "error": {"code": "session_not_found", "message": "no session 's2'"}}),
        Example("stats", {"op": "stats", "id": 17},
                {"id": 17, "ok": True, "stats": {"memory": {"weights": 1 << 30, "kv_device": 0},
                                                 "sessions": {"ACTIVE": 1}, "bandwidth_gbps": 51.5}}),
        Example("cancel", {"op": "cancel", "id": 18, "target_id": 4}, {"id": 18, "ok": True, "cancelled": True}),
        Example("session_info", {"op": "session_info", "id": 19, "session_id": "s1"},
                {"id": 19, "ok": True, "info": {"phase": "ACTIVE", "tokens": 12, "kv_blocks": 1}}),
        Example("echo", {"op": "echo", "id": 20, "data": [0, 1]}, {"id": 20, "ok": True, "data": [0, 1]},
                [vec, act], [vec, act]),
    ]


def frame_bytes(header: dict, tensors=()) -> bytes:
    """A whole frame as bytes (for tests that cut or corrupt it)."""
    return b"".join(bytes(p) for p in frames.encode_message(header, tensors))


def _send_then_eof(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the reader gave up early (e.g. an oversized prefix) and closed its end


def recv_raw(data: bytes, **kwargs) -> list:
    """Feed ``data`` then EOF to recv_message over a socketpair; read frames until the first
    exception. Returns [Message..., exception]."""
    a, b = socket.socketpair()
    b.settimeout(TIMEOUT)
    sender = threading.Thread(target=_send_then_eof, args=(a, data), daemon=True)
    sender.start()
    out: list = []
    try:
        while True:
            try:
                out.append(frames.recv_message(b, **kwargs))
            except Exception as exc:  # noqa: BLE001 - the caller checks the type
                out.append(exc)
                return out
    finally:
        b.close()
        sender.join(TIMEOUT)
        a.close()


async def _aread_raw(data: bytes, **kwargs) -> list:
    a, b = socket.socketpair()
    a.setblocking(False)
    loop = asyncio.get_running_loop()

    async def send() -> None:
        try:
            await loop.sock_sendall(a, data)
            a.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    reader, writer = await asyncio.open_connection(sock=b)
    sender = asyncio.create_task(send())
    out: list = []
    try:
        while True:
            try:
                out.append(await asyncio.wait_for(frames.read_message(reader, **kwargs), TIMEOUT))
            except asyncio.TimeoutError:
                raise
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
                return out
    finally:
        writer.close()
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        a.close()


def aread_raw(data: bytes, **kwargs) -> list:
    """Like recv_raw, through asyncio streams (read_message)."""
    return asyncio.run(_aread_raw(data, **kwargs))


class _CountingSocket:
    """A non-blocking socket that counts the system calls that send."""

    def __init__(self, sock: socket.socket):
        self.sock, self.calls = sock, 0

    def send(self, data) -> int:
        self.calls += 1
        return self.sock.send(data)

    def sendmsg(self, buffers) -> int:
        self.calls += 1
        return self.sock.sendmsg(buffers)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def send_on_loop(send, tensors: list[torch.Tensor], sndbuf: int | None = None) -> tuple[frames.Message, int]:
    """Send one frame with ``send(loop, sock)`` on an event loop while a thread receives it (and
    checks its tensors); returns the frame and how many system calls sent it."""
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    a.setblocking(False)
    b.settimeout(TIMEOUT)
    counting = _CountingSocket(a)
    got: list = []
    with a, b:
        reader = threading.Thread(target=lambda: got.append(frames.recv_message(b)))
        reader.start()

        async def main():
            await asyncio.wait_for(send(asyncio.get_running_loop(), counting), TIMEOUT)

        asyncio.run(main())
        reader.join(TIMEOUT)
    assert len(got[0].tensors) == len(tensors)
    assert all(torch.equal(x, y) for x, y in zip(got[0].tensors, tensors))
    return got[0], counting.calls

