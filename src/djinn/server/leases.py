"""Leases: a session outlives its client's connection by ``lease_seconds``, no longer.

A session is *held* by the live connections that opened it or used it. When the last one
drops, the session's lease starts; a connection of the same principal that takes it up
again (``session_open`` with its id, or any request naming it) stops the lease; otherwise,
when the lease ends, the session is closed, which frees its KV blocks and its server-side
tensors. Closing a session explicitly forgets it here.

Runs on the server's asyncio loop only (no locks). Sessions the native server never saw
(e.g. opened by the HTTP front end) are not its business.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


class Leases:
    def __init__(self, lease_seconds: float, expire: Callable[[str, str], Awaitable[None]]):
        """``expire(session_id, owner)`` closes a session whose lease ended."""
        self.lease_seconds = lease_seconds
        self._expire = expire
        self._owner: dict[str, str] = {}
        self._holders: dict[str, set[int]] = {}
        self._held_by: dict[int, set[str]] = {}
        self._live: set[int] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._expiring: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.expired = 0

    # ---- connections -------------------------------------------------------------------
    def connected(self, conn: int) -> None:
        self._live.add(conn)

    def disconnected(self, conn: int) -> None:
        """``conn`` dropped: every session it alone held starts its lease."""
        self._live.discard(conn)
        for sid in self._held_by.pop(conn, set()):
            holders = self._holders.get(sid)
            if holders is not None:
                holders.discard(conn)
                if not holders:
                    self._start(sid)

    # ---- sessions ----------------------------------------------------------------------
    def expiring(self, session_id: str) -> bool:
        """True once a lease ended and its session is being closed (it cannot be taken up)."""
        return session_id in self._expiring

    def hold(self, session_id: str, owner: str, conn: int) -> None:
        """``conn`` opened or used ``session_id``: it holds it, and any lease stops."""
        if session_id in self._expiring:
            return
        self._owner[session_id] = owner
        holders = self._holders.setdefault(session_id, set())
        timer = self._timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        if conn in self._live:
            holders.add(conn)
            self._held_by.setdefault(conn, set()).add(session_id)
        elif not holders:   # its connection dropped while the request ran: lease at once
            self._start(session_id)

    def forget(self, session_id: str) -> None:
        """The session was closed: nothing to expire."""
        self._owner.pop(session_id, None)
        for conn in self._holders.pop(session_id, set()):
            self._held_by.get(conn, set()).discard(session_id)
        timer = self._timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()

    # ---- expiry ------------------------------------------------------------------------
    def _start(self, session_id: str) -> None:
        loop = asyncio.get_running_loop()
        self._timers[session_id] = loop.call_later(self.lease_seconds, self._fire, session_id)

    def _fire(self, session_id: str) -> None:
        self._timers.pop(session_id, None)
        owner = self._owner.get(session_id)
        if owner is None:
            return
        self._expiring.add(session_id)
        task = asyncio.get_running_loop().create_task(self._close(session_id, owner))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, session_id: str, owner: str) -> None:
        try:
            await self._expire(session_id, owner)
        finally:
            self.expired += 1
            self._expiring.discard(session_id)
            self.forget(session_id)

    def stats(self) -> dict:
        return {"sessions_held": sum(1 for h in self._holders.values() if h), "leases_running": len(self._timers),
                "lease_seconds": self.lease_seconds, "sessions_expired": self.expired}

    def cancel_all(self) -> None:
        """Shutdown: no lease fires any more (the engine closes every session itself)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
