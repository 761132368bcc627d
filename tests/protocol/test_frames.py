"""Frames over real sockets: round trips of every op, big tensors, copies, and the checks
that must happen before the body is read."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import tracemalloc

import msgpack
import pytest
import torch

from djinn.errors import ProtocolError
from djinn.protocol import (
    ConnectionClosed, Message, decode_frame, encode_message, read_message, recv_message, send_message,
    validate_reply, validate_request, write_message,
)
from djinn.protocol.frames import MAGIC, PREFIX, PROTOCOL_VERSION
from tests.protocol.helpers import TIMEOUT, aread_raw, examples, frame_bytes, recv_raw, send_on_loop

MB64 = 64 * 2**20


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.cpu(), y)


def sync_roundtrip(header: dict, tensors=()) -> Message:
    a, b = socket.socketpair()
    b.settimeout(TIMEOUT)
    with a, b:
        t = threading.Thread(target=send_message, args=(a, header, tensors))
        t.start()
        msg = recv_message(b)
        t.join(TIMEOUT)
    return msg


async def _async_roundtrip(header: dict, tensors=()) -> Message:
    a, b = socket.socketpair()
    reader, keep = await asyncio.open_connection(sock=b)  # a dropped StreamWriter closes its socket
    _, writer = await asyncio.open_connection(sock=a)
    try:
        send = asyncio.create_task(write_message(writer, header, tensors))
        msg = await asyncio.wait_for(read_message(reader), TIMEOUT)
        await send
        return msg
    finally:
        writer.close()
        keep.close()


def async_roundtrip(header: dict, tensors=()) -> Message:
    return asyncio.run(_async_roundtrip(header, tensors))


@pytest.mark.parametrize("roundtrip", [sync_roundtrip, async_roundtrip], ids=["socket", "asyncio"])
@pytest.mark.parametrize("ex", examples(), ids=lambda e: e.op)
def test_every_op_round_trips(roundtrip, ex):
    msg = roundtrip(ex.request, ex.request_tensors)
    assert msg.header == ex.request
    assert_same(msg.tensors, ex.request_tensors)
    assert validate_request(msg.header, msg.tensors)["op"] == ex.op
    reply = roundtrip(ex.reply, ex.reply_tensors)
    assert reply.header == ex.reply
    assert_same(reply.tensors, ex.reply_tensors)
    assert validate_reply(ex.op, reply.header, reply.tensors)["id"] == ex.reply["id"]


def every_dtype_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        out += [torch.randn(3, 5, generator=g).to(dtype), torch.tensor(1.5, dtype=dtype), torch.empty(0, 4, dtype=dtype)]
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        info = torch.iinfo(dtype)
        out += [torch.tensor([info.min, info.max, 0, 1, 7], dtype=dtype), torch.tensor(3, dtype=dtype),
                torch.empty(2, 0, 3, dtype=dtype)]
    out += [torch.tensor([True, False, True]), torch.tensor(True), torch.empty(0, dtype=torch.bool)]
    out += [torch.ones(1, 1, 1, 1, 1, 1, 1, 2), torch.tensor([float("nan"), float("inf"), -0.0])]
    return out


@pytest.mark.parametrize("roundtrip", [sync_roundtrip, async_roundtrip], ids=["socket", "asyncio"])
def test_every_dtype_zero_dim_and_empty(roundtrip):
    ts = every_dtype_tensors()
    msg = roundtrip({"op": "stats", "id": 1}, ts)
    assert len(msg.tensors) == len(ts)
    for x, y in zip(ts, msg.tensors):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim() else y)


def test_bfloat16_travels_as_raw_bits():
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    pieces = encode_message({"op": "stats", "id": 1}, [t])
    assert bytes(pieces[2]) == t.view(torch.int16).numpy().tobytes()


def test_received_tensors_are_writable_views_of_one_buffer():
    a, b = torch.arange(3, dtype=torch.int8), torch.randn(4, 4)
    msg = sync_roundtrip({"op": "stats", "id": 1}, [a, b])
    x, y = msg.tensors
    assert y.data_ptr() - x.data_ptr() == 8  # 3 bytes padded to 8, no copy in between
    assert y.data_ptr() % 8 == 0
    y.mul_(2)  # writable; no warnings about read-only buffers
    assert torch.equal(y, b * 2)


def test_non_contiguous_and_strided_tensors_are_sent_by_value():
    base = torch.arange(24.0).reshape(4, 6)
    negated = torch.tensor([1 + 2j, 3 - 1j]).conj().imag  # a view with torch's lazy "neg" bit
    assert negated.is_neg()
    ts = [base.t(), base[:, ::2], base[1], base[::3], negated]
    msg = sync_roundtrip({"op": "stats", "id": 1}, ts)
    assert_same(msg.tensors, [t.resolve_neg().contiguous() for t in ts])


def test_sender_buffers_alias_the_tensor_memory():
    t = torch.randn(1024, 1024)
    pieces = encode_message({"op": "stats", "id": 1}, [t])
    view = pieces[2]
    assert view.nbytes == t.numel() * 4
    import numpy as np
    assert np.frombuffer(view, dtype=np.uint8).ctypes.data == t.data_ptr()  # no copy on encode


def _peak_traced(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.timeout(120)
def test_64mb_tensor_socket_round_trip_copies_once_at_most():
    big = torch.randn(MB64 // 4)
    a, b = socket.socketpair()
    b.settimeout(TIMEOUT)
    got: list = []
    with a, b:
        t = threading.Thread(target=lambda: got.append(recv_message(b)))
        t.start()
        start = time.perf_counter()
        send_peak = _peak_traced(lambda: send_message(a, {"op": "stats", "id": 1}, [big]))
        t.join(TIMEOUT)
        elapsed = time.perf_counter() - start
    assert torch.equal(got[0].tensors[0], big)
    # the sender allocates no copy of the payload (tracemalloc sees the receiver's 64 MB
    # payload buffer too, as both run in this process; anything beyond that would be a copy)
    assert send_peak < MB64 + 4 * 2**20, send_peak
    print(f"socket 64 MiB: {elapsed * 1e3:.0f} ms ({MB64 / elapsed / 1e9:.2f} GB/s), "
          f"traced peak {send_peak / 2**20:.1f} MiB")


@pytest.mark.timeout(120)
def test_64mb_tensor_asyncio_round_trip_copies_once_at_most():
    big = torch.randn(MB64 // 4)

    async def main():
        a, b = socket.socketpair()
        reader, keep = await asyncio.open_connection(sock=b)
        _, writer = await asyncio.open_connection(sock=a)
        send = asyncio.create_task(write_message(writer, {"op": "stats", "id": 1}, [big]))
        msg = await asyncio.wait_for(read_message(reader), TIMEOUT)
        await send
        writer.close()
        keep.close()
        return msg

    got: list = []
    peak = _peak_traced(lambda: got.append(asyncio.run(main())))
    assert torch.equal(got[0].tensors[0], big)
    # one 64 MB payload buffer on the reader; the writer's transport and the reader's
    # stream buffer only ever hold small pieces (a full concatenation would add 64 MB)
    assert peak < MB64 + 8 * 2**20, peak
    print(f"asyncio 64 MiB round trip: traced peak {peak / 2**20:.1f} MiB")


def test_writelines_path_of_newer_pythons(monkeypatch):
    from djinn.protocol import frames
    monkeypatch.setattr(frames, "_WRITELINES_GATHERS", True)  # functional check; zero-copy needs 3.12
    ex = examples()[3]
    msg = async_roundtrip(ex.request, ex.request_tensors)
    assert msg.header == ex.request and torch.equal(msg.tensors[0], ex.request_tensors[0])


def test_oversized_prefix_fails_before_reading_the_body():
    prefix = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 10, 2**60)
    a, b = socket.socketpair()
    b.settimeout(TIMEOUT)
    with a, b:
        a.sendall(prefix)  # and nothing else: reading any further would block until TIMEOUT
        start = time.perf_counter()
        tracemalloc.start()
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            recv_message(b, max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.perf_counter() - start < 1.0 and peak < 1 << 16


@pytest.mark.parametrize("header_len,payload_len,limit", [(2**32 - 1, 0, 1 << 20), (100, (1 << 20) - 99, 1 << 20)])
def test_oversized_header_or_total_is_refused_from_the_prefix(header_len, payload_len, limit):
    data = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, header_len, payload_len)
    for result in (recv_raw(data, max_bytes=limit), aread_raw(data, max_bytes=limit)):
        assert isinstance(result[-1], ProtocolError) and "exceeds the limit" in str(result[-1])


def test_limit_is_inclusive_and_configurable():
    frame = frame_bytes({"op": "stats", "id": 1}, [torch.zeros(100, dtype=torch.uint8)])
    body = len(frame) - 16
    assert isinstance(recv_raw(frame, max_bytes=body)[0], Message)
    assert "exceeds the limit" in str(recv_raw(frame, max_bytes=body - 1)[0])


@pytest.mark.parametrize("prefix,match", [
    (b"GET / HTTP/1.1\r\n", "HTTP request"),
    (b"\x16\x03\x01" + bytes(13), "TLS"),
    (b"XX" + bytes(14), "bad magic"),
    (PREFIX.pack(MAGIC, 2, 0, 1, 0), "protocol version 2"),
    (PREFIX.pack(MAGIC, PROTOCOL_VERSION, 1, 1, 0), "flags"),
    (PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 0, 0), "empty header"),
])
def test_bad_prefixes_are_named(prefix, match):
    for result in (recv_raw(prefix), aread_raw(prefix)):
        assert isinstance(result[0], ProtocolError) and match in str(result[0])


def raw_frame(head: bytes, payload: bytes = b"") -> bytes:
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(head), len(payload)) + head + payload


@pytest.mark.parametrize("head,payload,match", [
    (msgpack.packb([1, 2]), b"", "must be a msgpack map"),
    (msgpack.packb(7), b"", "must be a msgpack map"),
    (b"\xc1", b"", "not valid msgpack"),
    (msgpack.packb({"a": 1}) + b"\x00", b"", "not valid msgpack"),
    (msgpack.packb({1: 2}), b"", "not valid msgpack"),
    (msgpack.packb({b"k": 2}, use_bin_type=True), b"", "keys must be strings"),
    (msgpack.packb({"t": msgpack.ExtType(5, b"x")}), b"", "extension type"),
    (msgpack.packb({"t": msgpack.Timestamp(1)}), b"", "extension type"),
    (b"\xa2\xff\xfe", b"", "not valid msgpack"),
    (b"\xdd\xff\xff\xff\xff", b"", "not valid msgpack"),
    (b"\x91" * 2000 + b"\xc0", b"", "not valid msgpack"),
    (msgpack.packb({"tensors": [{"dtype": "complex64", "shape": [1], "nbytes": 8}]}), bytes(8), "unknown dtype"),
    (msgpack.packb({"tensors": [{"dtype": "object", "shape": [1], "nbytes": 8}]}), bytes(8), "unknown dtype"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [2], "nbytes": 4}]}), bytes(8), "needs 8"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [-1], "nbytes": 4}]}), bytes(8), "non-negative"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [1] * 9, "nbytes": 4}]}), bytes(8), "at most 8"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [True], "nbytes": 4}]}), bytes(8), "non-negative"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [1], "nbytes": 4, "x": 1}]}), bytes(8), "unknown"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [1]}]}), bytes(8), "missing"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [1], "nbytes": 4}]}), bytes(16), "need 8 bytes"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [1], "nbytes": 4}]}), bytes(4), "need 8 bytes"),
    (msgpack.packb({"tensors": [{"dtype": "float32", "shape": [1], "nbytes": 4}]}), bytes(4) + b"\x01" + bytes(3),
     "padding"),
    (msgpack.packb({"tensors": [{"dtype": "bool", "shape": [2], "nbytes": 2}]}), b"\x01\x02" + bytes(6), "bool"),
    (msgpack.packb({"tensors": {"dtype": "bool"}}), b"", "must be a list"),
    (msgpack.packb({"tensors": [7]}), b"", "must be a map"),
    (msgpack.packb({"tensors": [{"dtype": "uint8", "shape": [2**40, 2**40], "nbytes": 2**63}]}), b"",
     "needs 1208925819614629174706176"),
    (msgpack.packb({"tensors": [{"dtype": "uint8", "shape": [2**30, 2**30], "nbytes": 2**60}]}), b"",
     "exceeds the message limit"),
])
def test_malformed_headers_and_descriptors(head, payload, match):
    frame = raw_frame(head, payload)
    for result in (recv_raw(frame), aread_raw(frame)):
        assert isinstance(result[0], ProtocolError), result
        assert match in str(result[0])
    with pytest.raises(ProtocolError, match=match):
        decode_frame(frame)


def test_truncation_at_every_cut_point():
    frame = frame_bytes(examples()[3].request, examples()[3].request_tensors)
    assert len(frame) < 4096
    for cut in range(len(frame)):
        for result in (recv_raw(frame[:cut]), aread_raw(frame[:cut]) if cut % 7 == 0 else None):
            if result is None:
                continue
            assert len(result) == 1 and isinstance(result[0], ConnectionClosed), (cut, result)
            assert result[0].clean == (cut == 0)
        with pytest.raises(ProtocolError):
            decode_frame(frame[:cut])


def test_back_to_back_frames_and_clean_close():
    exs = examples()
    data = b"".join(frame_bytes(e.request, e.request_tensors) for e in exs)
    for result in (recv_raw(data), aread_raw(data)):
        assert [m.header for m in result[:-1]] == [e.request for e in exs]
        assert isinstance(result[-1], ConnectionClosed) and result[-1].clean


def test_encoder_refuses_what_the_decoder_would_refuse():
    with pytest.raises(ProtocolError, match="reserved"):
        encode_message({"tensors": []})
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        encode_message({"x": object()})
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        encode_message({"x": 2**70})
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode_message({}, [torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(ProtocolError, match="dense"):
        encode_message({}, [torch.zeros(2, 2).to_sparse()])
    with pytest.raises(ProtocolError, match="dimensions"):
        encode_message({}, [torch.zeros([1] * 9)])
    with pytest.raises(ProtocolError, match="torch.Tensor"):
        encode_message({}, [[1, 2]])
    with pytest.raises(ProtocolError, match="header must be a dict"):
        encode_message([1])  # type: ignore[arg-type]


def test_peer_reset_mid_frame_is_connection_closed():
    frame = frame_bytes({"op": "stats", "id": 1}, [torch.zeros(1000)])
    a, b = socket.socketpair()
    b.settimeout(TIMEOUT)
    a.sendall(frame[:100])
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    with b, pytest.raises(ConnectionClosed):
        recv_message(b)


def test_send_to_closed_peer_is_connection_closed():
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(ConnectionClosed):
        send_message(a, {"op": "stats", "id": 1}, [torch.zeros(1 << 20)])


def test_event_loop_send_gathers_a_frame_into_one_call():
    """prefix, header and a 64 KiB tensor leave in one ``sendmsg`` from their own memory."""
    from djinn.protocol.frames import sock_sendmsg_all

    t = torch.randn(64 * 1024 // 4)
    header = {"op": "stats", "id": 1}
    msg, calls = send_on_loop(lambda loop, s: sock_sendmsg_all(loop, s, encode_message(header, [t])), [t],
                               sndbuf=1 << 20)
    assert msg.header == header and calls == 1


@pytest.mark.timeout(60)
def test_event_loop_send_waits_for_room_and_resumes_mid_piece():
    """A frame far larger than the socket's buffer: many partial sends, each resumed where the
    last one stopped (inside a tensor and across the pieces), waiting for room in between."""
    from djinn.protocol.frames import sock_sendmsg_all

    ts = [torch.arange(5, dtype=torch.int8), torch.randn(2 << 20), torch.arange(3 << 18, dtype=torch.int64)]
    msg, calls = send_on_loop(lambda loop, s: sock_sendmsg_all(loop, s, encode_message({"id": 7}, ts)), ts)
    assert msg.header == {"id": 7} and calls > 3


def test_received_payload_is_one_uninitialised_buffer_not_a_zero_filled_bytearray(monkeypatch):
    """The receive fills the payload in place, so it is allocated without a zero fill
    (``bytearray(n)`` wrote every byte once more: 0.16 ms per 4 MiB, 30 ms for a fresh 64 MiB)."""
    from djinn.protocol import frames

    sizes = []
    real = frames.payload_buffer
    monkeypatch.setattr(frames, "payload_buffer", lambda n: sizes.append(n) or real(n))
    t = torch.randn(1000)
    msg = sync_roundtrip({"op": "stats", "id": 1}, [t])
    assert sizes == [4000] and torch.equal(msg.tensors[0], t)
    assert not isinstance(real(16).obj, bytearray)
