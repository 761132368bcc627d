"""server/wire.py: the server's frames on its event loop's non-blocking sockets."""

from __future__ import annotations

import torch

from djinn.server.wire import send_frame
from tests.protocol.helpers import send_on_loop


def test_a_reply_with_a_tensor_is_one_gathered_send():
    """Regression (``djinn bench protocol`` below its 1 GB/s target): a reply went out as one
    send of the joined prefix and header, then one per tensor; now ``sendmsg`` gathers them
    from their own memory in one system call while the socket has room."""
    t = torch.randn(64 * 1024 // 4)
    header = {"id": 3, "ok": True, "data": [0]}
    msg, calls = send_on_loop(lambda loop, sock: send_frame(loop, sock, header, [t]), [t], sndbuf=1 << 20)
    assert msg.header == header and calls == 1


def test_a_reply_larger_than_the_socket_buffer_arrives_whole():
    ts = [torch.randn(3 << 20), torch.arange(10, dtype=torch.int16)]
    msg, calls = send_on_loop(lambda loop, sock: send_frame(loop, sock, {"id": 4, "ok": True}, ts), ts)
    assert msg.header == {"id": 4, "ok": True} and calls > 2
