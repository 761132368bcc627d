"""Djinn's servers: the native protocol (``djinn.connect``) and, where built, the
OpenAI-compatible HTTP API (``http/``); both drive one engine.

- app.py         ``serve()``: the ``djinn serve`` command (startup, banner, signals, shutdown)
- native.py      the asyncio server: connections, shutdown
- connection.py  one connection: handshake, requests, replies
- handlers.py    what each op does (request -> engine call -> reply)
- gateway.py     awaiting the engine's loop thread from asyncio, cancellably
- leases.py      sessions outliving their connection by a lease
- auth.py        token and bind policy, session ownership
"""

from djinn.server.app import run_server, serve
from djinn.server.auth import principal_for_token
from djinn.server.native import NativeServer

__all__ = ["serve", "run_server", "NativeServer", "principal_for_token"]
