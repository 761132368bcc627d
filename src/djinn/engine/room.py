"""Making room on the device: the policy's view of each session (``Candidate``), the victims it
picks, and what a request waits for when no room can be made now (a copy in flight, or running
turns: ``RoomHeld``). A mixin of ``engine.residency.Residency``, as ``kv_moves`` and
``wait_plans`` are, split out to keep one concept per file; everything here runs under
``Residency.lock`` except ``make_room``'s wait.
"""

from __future__ import annotations

import time
from collections import Counter
from fractions import Fraction
from typing import TYPE_CHECKING

from djinn.engine.session import Phase, Session
from djinn.errors import CapacityError
from djinn.memory.pager import IN, OUT, Transfer
from djinn.memory.policy import Action, Candidate, KVState

if TYPE_CHECKING:
    from djinn.engine.residency import _Tier


class RoomHeld(CapacityError):
    """No room now, but running turns hold enough of it: the request can wait for one of them
    to end (``Engine`` retries it after a batch step) instead of failing."""


class CopyPending(RoomHeld):
    """The turn's KV is being restored. Raised instead of waiting when the caller asked not to
    wait (``wait=False``): the engine keeps the turn aside and starts it again once ``transfer``
    is done, stepping the other turns meanwhile, instead of holding the loop for the copy."""

    def __init__(self, transfer: Transfer):
        super().__init__("waiting for a copy of KV in flight")
        self.transfer = transfer


class Room:
    """Mixin of ``Residency``: making room for ``need`` device blocks."""

    def make_room(self, model: str, blocks: int, protect: set[str] = frozenset(), wait: bool = True) -> None:
        """Make ``blocks`` device blocks of ``model`` free, evicting idle sessions not in
        ``protect`` as the policy orders. Raises CapacityError (evicting nothing) if that cannot
        be done; with ``wait=False`` only starts the copies."""
        while True:
            with self.lock:
                waiter = self._room(model, blocks, set(protect))
            if waiter is None or not wait:
                return
            self._block_on(waiter, "room")

    def _block_on(self, waiter: Transfer, why: str) -> float:
        """Wait for a copy (outside the lock) and count the seconds under ``why`` (``room``:
        others' parks; ``restore``: the session's own KV): while the engine loop waits here,
        no turn advances."""
        t = time.perf_counter()
        waiter.wait()
        took = time.perf_counter() - t
        self.blocked_s[why] += took
        return took

    def _candidate(self, s: Session) -> Candidate:
        pool = self.tiers[s.model].pool
        expected, waited, est = None, 0.0, None
        if s.phase is Phase.IO_WAIT:
            waited = self.clock() - s.phase_since
            est = self.waits.estimate(s.wait_ema, s.wait_dev)
            expected = None if est is None else est.mean_s - waited
        blocks = max(len(s.block_table), len(s.host_table))
        return Candidate(id=s.id, phase=s.phase.value, state=s.kv_state, blocks=len(s.block_table),
                         reclaimable=sum(1 for b in s.block_table if pool.refcount(b) == 1),
                         idle_since=s.last_used, expected_back_s=expected,
                         kv_bytes=blocks * pool.shape.block_bytes, waited_s=waited, wait=est,
                         kept=s.wait_plan is not None and s.wait_plan.kept, host_blocks=len(s.host_table))

    def _room(self, model: str, need: int, protect: set[str]) -> Transfer | None:
        """Start what makes ``need`` blocks free. None if they are free now, else a copy to wait
        for before asking again. Raises CapacityError, having evicted nothing, if impossible."""
        tier = self.tiers[model]
        pool = tier.pool
        self._reap()
        if pool.free_count >= need:
            return None
        if need > pool.capacity:
            raise CapacityError(
                f"this request needs {need} KV blocks ({need * pool.shape.block_bytes / 2**20:.1f} MiB) but the "
                f"device KV pool of model {model!r} holds {pool.capacity} in all: use a shorter prompt or fewer "
                "new tokens, or raise --gpu-memory")
        incoming = self._incoming(model)
        short = need - pool.free_count - incoming
        if short > 0:
            cands = [self._candidate(x) for x in tier.sessions.values()
                     if x.id not in protect and not x.pinned and x.kv_state is KVState.DEVICE and x.block_table]
            self._credit_shared(tier, cands)
            plan = self.policy.victims(cands, short, tier.arena.free_count)
            if plan is None and self.policy.moves_kv:
                # sessions being restored (prefetched) become evictable when their copy lands
                restoring = [m for m in self.moves if m.model == model and m.kind == IN and not m.cancelled
                             and m.session.id not in protect and not m.session.pinned]
                if restoring and sum(c.reclaimable for c in cands) + sum(len(m.device_blocks) for m in restoring) >= short:
                    return restoring[0].transfer
            if plan is None and self.policy.moves_kv:
                # blocks of running turns become evictable when the turn ends: worth waiting for
                # (a turn set aside for its restore holds the copy's blocks: they are not in its
                # table until the copy is settled)
                held = sum(len(x.block_table) + (len(x.move.device_blocks) if x.admitting and x.move else 0)
                           for x in tier.sessions.values() if x.pinned and x.id not in protect)
                if held and sum(c.reclaimable for c in cands) + held >= short:
                    raise RoomHeld(
                        f"no room for {need} KV blocks on {pool.device} now: running turns hold {held}; "
                        "retry when one ends")
            if plan is None:
                raise CapacityError(
                    f"no room for {need} KV blocks on {pool.device}: {pool.free_count} free, "
                    f"{pool.capacity - pool.free_count} held by sessions that "
                    + ("the 'resident' policy never moves" if not self.policy.moves_kv else "cannot be moved now")
                    + "; retry later, close sessions, or raise --gpu-memory")
            for sid, action in plan:
                victim = tier.sessions[sid]
                self._note_evicted(victim)
                if action is Action.PARK:
                    self._park(victim, allow_drop=True)
                else:
                    self._drop(victim)
        if pool.free_count >= need:
            return None
        for m in self.moves:
            if m.model == model and ((m.kind == OUT and not m.cancelled) or (m.kind == IN and m.cancelled)):
                return m.transfer
        raise CapacityError(f"no room for {need} KV blocks on {pool.device} and nothing is being freed")  # pragma: no cover

    def _credit_shared(self, tier: _Tier, cands: list[Candidate]) -> None:
        """A block shared (a fork, a common prefix) only by candidates comes free once all of them
        are evicted: each holder is credited its share of it (``Fraction(1, holders)``), so the
        policy sees that evicting all of them frees it, and never counts a block that a running
        session or another, protected one still holds."""
        pool = tier.pool
        holders = Counter(b for c in cands for b in tier.sessions[c.id].block_table if pool.refcount(b) > 1)
        if not holders:
            return
        for c in cands:
            table = tier.sessions[c.id].block_table
            by_k = Counter(holders[b] for b in table if pool.refcount(b) > 1 and holders[b] == pool.refcount(b))
            c.reclaimable += sum((Fraction(n, k) for k, n in by_k.items()), Fraction(0))

    def _incoming(self, model: str) -> int:
        """Device blocks that copies in flight will free when they complete (a shared block
        only if every one of its holders is being parked)."""
        pool = self.tiers[model].pool
        n = 0
        parking: Counter = Counter()
        for m in self.moves:
            if m.model != model:
                continue
            if m.kind == OUT and not m.cancelled:
                parking.update(m.device_blocks)
            elif m.kind == IN and m.cancelled:
                n += sum(1 for b in m.device_blocks if pool.refcount(b) == 1)
        return n + sum(1 for b, k in parking.items() if pool.refcount(b) == k)
