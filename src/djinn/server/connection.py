"""One client connection: the handshake, then requests read in order and answered as they finish.

Lifecycle and invariants:
- The first frame must be ``hello``, read with a small size limit (64 KiB) and a timeout,
  so an unauthenticated peer can neither make the server allocate a large payload nor
  hold a connection open for free. A wrong protocol version or token is answered with a
  typed error and the connection is closed.
- After that, every frame is read with the server's ``max_message_bytes``. A frame that
  cannot be read (garbage, a cut-off frame, a bad descriptor, oversized) leaves the stream
  position unknown: it is answered with an error of request id 0 and the connection is
  closed. A frame that reads but does not validate (unknown op, bad field) is answered
  with a typed error for its request id and the connection stays usable.
- Each request runs as its own task, so a ``cancel`` or a ``stats`` is read while a long
  generation runs. Per connection at most ``MAX_IN_FLIGHT`` requests, and payloads of about
  two messages, are held at once; then reading waits. Replies are written whole, one at a
  time (a write lock), and carry their request's id.
- When the connection ends, its requests that have not reached the engine yet are
  cancelled and its sessions start their leases (server/leases.py).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import socket
from typing import Any

import torch

from djinn.errors import AuthError, Cancelled, DjinnError, InvalidRequest, ProtocolError
from djinn.protocol import PROTOCOL_VERSION, ConnectionClosed, error_reply, ok_reply, request_id, validate_request
from djinn.server.auth import check_token, principal
from djinn.server.gateway import EngineCall
from djinn.server.handlers import OPS, RequestContext, hello_reply
from djinn.server.wire import recv_frame, send_frame

log = logging.getLogger("djinn.server")

HELLO_MAX_BYTES = 64 << 10
HELLO_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 64
_ids = itertools.count(1)


class Connection:
    def __init__(self, server, sock: socket.socket, peer: Any):
        self.server = server
        self.sock, self.peer = sock, peer
        self.loop = asyncio.get_running_loop()
        self.id = next(_ids)
        self.owner: str | None = None
        self._write_lock = asyncio.Lock()
        self._sending: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()    # requests being handled (read, not yet answered)
        self._held_bytes = 0                        # their payload bytes
        self._room = asyncio.Event()                # set when a request finished
        self._inflight: dict[int, tuple[asyncio.Task, EngineCall]] = {}
        self.closing = False

    # ---- the connection's life -----------------------------------------------------------
    async def run(self) -> None:
        try:
            if await self._handshake():
                await self._serve()
        except ConnectionClosed:
            pass
        except ProtocolError as exc:     # an unreadable frame: say why, then hang up
            log.info("connection %s (%s): %s", self.id, self.peer, exc)
            await self._send(error_reply(0, exc))
        except asyncio.CancelledError:
            pass
        finally:
            await self._close()

    async def _handshake(self) -> bool:
        try:
            msg = await asyncio.wait_for(recv_frame(self.loop, self.sock, HELLO_MAX_BYTES, HELLO_MAX_BYTES),
                                         HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self._send(error_reply(0, AuthError(f"no hello within {HELLO_TIMEOUT_S:.0f} s; closing")))
            return False
        rid = request_id(msg.header)
        try:
            req = validate_request(msg.header, msg.tensors)
            if req["op"] != "hello":
                raise AuthError(f"the first message must be hello (protocol version and token), got {req['op']!r}")
            if req["version"] != PROTOCOL_VERSION:
                raise ProtocolError(f"client speaks protocol version {req['version']}, this server speaks "
                                    f"{PROTOCOL_VERSION}; install matching djinn versions")
            check_token(self.server.config.token, req["token"])
        except DjinnError as exc:
            log.info("connection %s (%s) refused: %s", self.id, self.peer, exc)
            await self._send(error_reply(rid, exc))
            return False
        self.owner = principal(self.server.config.token, req.get("client_key"), self.id)
        self.server.leases.connected(self.id)
        await self._send(ok_reply(rid, **hello_reply(self.server)))
        return True

    async def _serve(self) -> None:
        limit = self.server.config.max_message_bytes
        while True:
            # backpressure: a client cannot make the server hold more than MAX_IN_FLIGHT requests,
            # nor more than about two messages' worth of payload, for it at once
            while len(self._tasks) >= MAX_IN_FLIGHT or self._held_bytes >= limit:
                self._room.clear()
                await self._room.wait()
            msg = await recv_frame(self.loop, self.sock, limit)
            size = sum(t.numel() * t.element_size() for t in msg.tensors)
            self._held_bytes += size
            task = self.loop.create_task(self._request(msg.header, msg.tensors))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, size))

    def _finished(self, size: int, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._held_bytes -= size
        self._room.set()

    async def _close(self) -> None:
        self.closing = True
        for task, call in list(self._inflight.values()):
            if call.cancel():   # not started on the engine: it never will (the client is gone)
                task.cancel()
        if self.owner is not None:
            self.server.leases.disconnected(self.id)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # a reply being sent fails now instead of waiting
        except OSError:
            pass
        sending = self._sending
        if sending is not None and not sending.done() and sending is not asyncio.current_task():
            sending.cancel()
            await asyncio.wait([sending], timeout=1.0)
        self.sock.close()

    # ---- one request --------------------------------------------------------------------
    async def _request(self, header: dict, tensors: list[torch.Tensor]) -> None:
        rid = request_id(header)
        try:
            req = validate_request(header, tensors)
        except DjinnError as exc:
            await self._send(error_reply(rid, exc))
            return
        if req["op"] == "cancel":
            await self._send(ok_reply(rid, cancelled=self._cancel(req["target_id"])))
            return
        if rid in self._inflight:
            await self._send(error_reply(rid, InvalidRequest(f"request id {rid} is already in flight on this "
                                                             "connection; use a new id per request")))
            return
        if self.server.stopping:
            await self._send(error_reply(rid, Cancelled("the server is shutting down; no new requests")))
            return
        call = EngineCall()
        self._inflight[rid] = (asyncio.current_task(), call)
        try:
            ctx = RequestContext(self.server, self.id, self.owner, call)
            fields, out = await OPS[req["op"]](ctx, req, tensors)
            reply, reply_tensors = ok_reply(rid, **fields), out
        except asyncio.CancelledError:
            why = "the server is shutting down" if self.server.stopping else "cancelled"
            reply, reply_tensors = error_reply(rid, Cancelled(f"request {rid} ({req['op']}): {why}; it did not "
                                                              "finish")), []
        except DjinnError as exc:
            reply, reply_tensors = error_reply(rid, exc), []
        except Exception as exc:  # a bug or a torch error: the client gets it typed, the log the trace
            log.exception("request %s (%s) failed", rid, req["op"])
            reply, reply_tensors = error_reply(rid, exc), []
        finally:
            self._inflight.pop(rid, None)
        await self._send(reply, reply_tensors)

    def _cancel(self, target: int) -> bool:
        entry = self._inflight.get(target)
        if entry is None:
            return False
        task, call = entry
        if call.future is None:   # not submitted yet
            task.cancel()
            return True
        return call.cancel()      # its task then ends with CancelledError and replies Cancelled

    def abandon(self) -> None:
        """Shutdown after the grace period: fail every request still in flight with Cancelled."""
        for task, _call in list(self._inflight.values()):
            task.cancel()

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    async def _send(self, header: dict[str, Any], tensors=()) -> None:
        async with self._write_lock:
            if self.closing and self.sock.fileno() < 0:
                return
            self._sending = asyncio.current_task()
            try:
                await send_frame(self.loop, self.sock, header, tensors)
            except ConnectionClosed:
                pass
            except ProtocolError as exc:   # our own reply could not be encoded: say so instead
                log.exception("reply %s could not be encoded", header.get("id"))
                try:
                    await send_frame(self.loop, self.sock, error_reply(header.get("id", 0), exc))
                except ConnectionClosed:
                    pass
            finally:
                self._sending = None
