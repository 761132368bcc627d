"""The native-protocol server: asyncio streams, one task per connection, one engine.

Why asyncio on plain sockets: a connection spends nearly all its life waiting (for its
client, or for the engine's loop thread, which runs one step at a time for everyone), so
one event loop thread serves any number of connections; the engine's futures are awaited,
not blocked on (server/gateway.py). Frames are length-prefixed (djinn.protocol), so no
framing library (zmq, websockets) is needed, and the payload of a frame is read straight
into the buffer its tensors view (server/wire.py: ``sock_recv_into`` rather than
StreamReader, which copies once more).

Shutdown (:meth:`NativeServer.stop`): stop accepting; requests that arrive from then on
are answered Cancelled; requests in flight get ``shutdown_grace_seconds`` to finish and be
answered; what is still running then is answered Cancelled; connections close; no lease
fires any more (the engine's own shutdown closes every session and frees its memory).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from djinn.config import ServerConfig
from djinn.engine import Engine
from djinn.errors import ModelNotFound
from djinn.server.connection import Connection
from djinn.server.admission import Admission
from djinn.server.gateway import EngineGateway
from djinn.server.handlers import model_config, model_files
from djinn.server.leases import Leases
from djinn.server.wire import listen

log = logging.getLogger("djinn.server")


class NativeServer:
    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.gateway = EngineGateway(engine)
        running = config.max_running if config.max_running is not None else engine.config.max_batch
        self.admission = Admission(config.max_queued, config.max_sessions_per_key, config.max_tokens_per_request,
                                   max_running=running)
        self.leases = Leases(config.lease_seconds, self._expire)
        self.connections: set[Connection] = set()
        self.stopping = False
        self._listeners: list[socket.socket] = []
        self._accepting: list[asyncio.Task] = []
        self._tasks: set[asyncio.Task] = set()
        self._model_info: dict[str, dict[str, Any]] = {}
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        """Listen on ``config.host:config.port`` (port 0: any free one); returns where."""
        self._listeners = listen(self.config.host, self.config.port)
        self.address = self._listeners[0].getsockname()[:2]
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept_loop(ls)) for ls in self._listeners]
        return self.address

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:   # e.g. out of file descriptors: keep serving the others
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # replies are small, latency-bound
            task = loop.create_task(self._serve(sock, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, peer) -> None:
        conn = Connection(self, sock, peer)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    async def _expire(self, session_id: str, owner: str) -> None:
        from djinn.errors import SessionNotFound

        try:
            await self.gateway.call(self.engine.close_session, session_id, owner=owner)
            log.info("session %s: lease of %.0f s ended, closed", session_id, self.config.lease_seconds)
        except SessionNotFound:
            pass
        except Exception:  # the engine stopping, for one
            log.exception("closing session %s after its lease failed", session_id)

    async def model_info(self, name: str) -> dict[str, Any]:
        """Config as JSON, tokenizer files, layers: built once per model, off the event loop."""
        if name not in self._model_info:
            rt = self.engine.runtimes.get(name)
            if rt is None:
                raise ModelNotFound(f"model {name!r} is not served here; this server has: "
                                    f"{', '.join(self.engine.runtimes)}")

            def build() -> dict[str, Any]:
                return {"name": name, "config": model_config(rt.loaded), "num_layers": rt.arch.num_layers,
                        "is_chat": bool(rt.loaded.is_chat), "tokenizer": {"files": model_files(rt.loaded)}}

            self._model_info[name] = await asyncio.to_thread(build)
        return self._model_info[name]

    def stats(self) -> dict[str, Any]:
        # the names of the process's Python threads: which pool grew, when a count grows (bench soak)
        return {"connections": len(self.connections), **self.leases.stats(), "admission": self.admission.stats(),
                "threads": sorted(t.name for t in threading.enumerate())}

    async def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace`` s, fail the rest."""
        self.stopping = True
        for task in self._accepting:
            task.cancel()
        for listener in self._listeners:
            listener.close()
        self.leases.cancel_all()
        deadline = asyncio.get_running_loop().time() + grace
        while any(c.busy for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abandon()
        await asyncio.sleep(0)   # let the abandoned requests write their Cancelled replies
        for _ in range(50):
            if not any(c.busy for c in self.connections):
                break
            await asyncio.sleep(0.01)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
