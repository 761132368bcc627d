"""Leases on their own (no engine, no sockets): who holds a session, when it expires."""

from __future__ import annotations

import asyncio

from djinn.server.leases import Leases


def run(coro):
    return asyncio.run(coro)


def test_a_session_expires_a_lease_after_its_last_connection_drops():
    async def main():
        closed: list = []

        async def expire(sid, owner):
            closed.append((sid, owner, asyncio.get_running_loop().time()))

        leases = Leases(0.2, expire)
        leases.connected(1)
        leases.connected(2)
        leases.hold("s", "alice", 1)
        leases.hold("s", "alice", 2)
        leases.disconnected(1)
        await asyncio.sleep(0.3)
        assert closed == []                      # connection 2 still holds it
        t0 = asyncio.get_running_loop().time()
        leases.disconnected(2)
        await asyncio.sleep(0.1)
        assert closed == [] and leases.stats()["leases_running"] == 1
        await asyncio.sleep(0.25)
        assert [c[:2] for c in closed] == [("s", "alice")] and closed[0][2] - t0 >= 0.2
        assert leases.stats() == {"sessions_held": 0, "leases_running": 0, "lease_seconds": 0.2,
                                  "sessions_expired": 1}

    run(main())


def test_taking_a_session_up_stops_its_lease_and_closing_forgets_it():
    async def main():
        closed: list = []

        async def expire(sid, owner):
            closed.append(sid)

        leases = Leases(0.15, expire)
        leases.connected(1)
        leases.hold("a", "o", 1)
        leases.hold("b", "o", 1)
        leases.disconnected(1)
        leases.connected(2)
        leases.hold("a", "o", 2)                 # reconnected and took "a" up
        leases.forget("b")                       # "b" was closed explicitly
        await asyncio.sleep(0.3)
        assert closed == []
        leases.hold("c", "o", 1)                 # held by a connection that is already gone
        await asyncio.sleep(0.3)
        assert closed == ["c"]

    run(main())


def test_shutdown_cancels_every_lease():
    async def main():
        closed: list = []

        async def expire(sid, owner):
            closed.append(sid)

        leases = Leases(0.1, expire)
        leases.connected(1)
        leases.hold("a", "o", 1)
        leases.disconnected(1)
        leases.cancel_all()
        await asyncio.sleep(0.2)
        assert closed == []

    run(main())
