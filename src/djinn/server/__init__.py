"""Djinn's servers: the native protocol (``djinn.connect``) and, where built, the
OpenAI-compatible HTTP API (``http/``); both drive one engine.

- app.py         ``serve()``: the ``djinn serve`` command (startup, banner, signals, shutdown)
- native.py      the asyncio server: accepting connections, shutdown
- connection.py  one connection: handshake, requests, replies
- handlers.py    what each op does (request -> engine call -> reply)
- gateway.py     awaiting the engine's loop thread from asyncio, cancellably
- wire.py        frames over non-blocking sockets, read into their final buffers
- leases.py      sessions outliving their connection by a lease
- auth.py        token and bind policy, session ownership
- launch.py      ``djinn serve`` as a child process (tests, benchmarks)

Decisions, in one place:
- **Transport**: asyncio on plain sockets, one task per connection and one per request;
  the engine runs requests one at a time on its own thread, and the event loop only waits
  on it (no thread per request). Frames are the protocol's (``djinn.protocol``).
- **Auth**: loopback-only unless a token is given (refused at start otherwise); the token is
  checked in constant time in ``hello``, the first message, read with a 64 KiB limit.
- **Ownership**: a session belongs to a principal: the token on a token server (every
  holder may use it, given its id), else the client's random ``client_key`` (so only that
  client, reconnecting, may). Others are told SessionNotFound, as for a missing id.
- **Leases**: a session whose last connection dropped lives ``--lease`` seconds (300) for its
  client to come back, then is closed (its KV blocks and server-side tensors freed).
- **Errors**: an unreadable frame is answered with an error of id 0, then the connection is
  closed; a readable but invalid request gets a typed error and the connection stays.
- **Shutdown**: stop accepting; requests in flight get ``shutdown_grace_seconds`` (10) to be
  answered, then are failed with Cancelled; the engine closes every session.
"""

from djinn.server.app import run_server, serve
from djinn.server.auth import principal_for_token
from djinn.server.native import NativeServer

__all__ = ["serve", "run_server", "NativeServer", "principal_for_token"]
