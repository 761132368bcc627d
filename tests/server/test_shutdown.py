"""Shutdown of the native server, in process: a request still waiting for the engine when
the grace period ends is answered Cancelled (without waiting for the engine), the
connection is closed, and no new connection is accepted."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from djinn.config import ServerConfig
from djinn.engine import Engine
from djinn.server.native import NativeServer
from tests.server.raw import Peer, frame

GRACE = 0.3


class InProcessServer:
    """A NativeServer on its own event loop thread; ``stop()`` runs its shutdown."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.server = NativeServer(self.engine, ServerConfig(port=0, shutdown_grace_seconds=GRACE))
        self.address = await self.server.start()
        self.ready.set()
        await self.stopping.wait()
        await self.server.stop(GRACE)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)


def test_requests_still_waiting_after_the_grace_period_are_cancelled():
    engine = Engine()                                    # no model needed: stats goes through the loop
    srv = InProcessServer(engine)
    try:
        with Peer(srv.address[:2]) as peer:
            assert peer.hello(None)["ok"]
            engine.loop.submit(time.sleep, 2.0)           # the engine is busy with something long
            peer.send(frame({"op": "stats", "id": 7}))    # so this waits in its queue
            time.sleep(0.1)
            t0 = time.monotonic()
            srv.stop()
            reply = peer.reply()
            waited = time.monotonic() - t0
            assert reply["id"] == 7 and reply["error"]["code"] == "cancelled", reply
            assert "shutting down" in reply["error"]["message"]
            assert GRACE <= waited < 1.5                  # after the grace period, not after the engine
            assert peer.closed_by_server()
        srv.thread.join(10)
        assert not srv.thread.is_alive()
        try:
            refused = socket.create_connection(srv.address[:2], timeout=2).recv(1) == b""
        except OSError:
            refused = True
        assert refused
    finally:
        if srv.thread.is_alive():
            srv.stop()
            srv.thread.join(10)
        engine.shutdown()
