"""The IO_WAIT half of ``engine.residency.Residency``: what happens to a session's KV while
its client waits for a tool.

On each IO_WAIT the policy (``memory.policy.plan_wait``) decides from the session's expected
wait whether to keep the KV on the device or park it, and when to bring it back; this module
carries the plan out and counts it (``Residency.decisions``). Its timers (``engine.timers``,
one thread) prefetch ahead of the expected return, only into free room, and park a wait that
overran its estimate. Everything here runs under ``Residency.lock`` (the timers take it) and
uses the residency's moves (``_park``, ``_drop``, ``_start_restore``, ``_cancel``, ``_reap``)
and its ``_candidate`` view, so it is a mixin of that class, split out to keep one concept per
file; it holds no state of its own beyond what ``Residency.__init__`` sets up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from djinn.engine.session import Phase, Session
from djinn.engine.timers import Timers
from djinn.memory.pager import IN, OUT
from djinn.memory.policy import Action, CopyRates, KVState, Room, WaitPlan


@dataclass(eq=False)
class _Wait:
    """One IO_WAIT of one session: the policy's plan and its timers (``session.wait_plan``).
    A timer acts only while this object is still the session's plan."""

    since: float                 # the wait's start (``session.phase_since``)
    plan: WaitPlan
    kept: bool = False           # the KV is on the device by choice (kept, or prefetched early)
    timers: list = field(default_factory=list)

    def cancel(self) -> None:
        for h in self.timers:
            h.cancel()


class WaitPlanning:
    """Mixin of ``Residency``: IO_WAIT plans, their timers and their counters."""

    def _plan_wait(self, s: Session) -> None:
        """Ask the policy what to do with ``s``'s KV for its current IO_WAIT, do it, count it
        (once per wait), and set the plan's timers."""
        plan = self.policy.plan_wait(self._candidate(s), self._room_now(s.model, s), self._rates())
        old = s.wait_plan
        if old is not None:
            old.cancel()
        w = _Wait(s.phase_since, plan, kept=plan.action is Action.KEEP)
        s.wait_plan = w
        if old is None or old.since != s.phase_since:      # a new wait (not the same one planned again)
            self._count_decision(plan)
        if plan.action is Action.PARK:
            self._park(s, allow_drop=False)
        elif plan.action is Action.DROP:
            self._drop(s)
        elif plan.action is Action.STANDBY:
            self._reclaim(s.model)             # the reserve may need it (or another) parked now
        for kind, at in (("prefetch", plan.prefetch_at_s), ("recheck", plan.recheck_at_s)):
            if at is not None:
                if self._timers is None:
                    self._timers = Timers(clock=self.clock, name="djinn-wait-timers")
                w.timers.append(self._timers.at(w.since + at, lambda kind=kind: self._wait_timer(s, w, kind)))

    def _wait_timer(self, s: Session, w: _Wait, kind: str) -> None:
        """A wait plan's timer (timer thread): prefetch ahead of the expected return (only into
        free room: a prediction never evicts anyone), or park a wait that overran its estimate."""
        with self.lock:
            tier = self.tiers.get(s.model)
            if s.wait_plan is not w or s.busy or s.phase is not Phase.IO_WAIT or tier is None \
                    or tier.sessions.get(s.id) is not s:
                return
            self._reap()
            action = self.policy.on_wait_timer(self._candidate(s), kind, self._room_now(s.model, s))
            if action is Action.PREFETCH:
                if s.kv_state is KVState.PARKING:
                    self._cancel(s)                  # the device copy is intact: keep it
                else:
                    self._start_restore(s)
                w.kept = True
                self.decisions["prefetch"] += 1
                self._reclaim(s.model)               # room it took may come from one due back later
            elif kind == "prefetch" and s.kv_state in (KVState.PARKING, KVState.PARKED):
                self.decisions["prefetch_no_room"] += 1   # no free room, or the memory is needed
            elif action is Action.PARK:
                w.kept = False
                self._park(s, allow_drop=False)
                self.decisions["late_park"] += 1

    def _room_now(self, model: str, planning: Session) -> Room:
        """The room of ``model``'s pool as the policy sees it while planning ``planning``'s wait
        (the standby blocks are other sessions': only counted under a reserve, since that walks
        every session)."""
        tier = self.tiers[model]
        wanted = sum(len(x.host_table) for x in self._wanted.values() if x.model == model and x.prefetch_wanted)
        reserve = self.policy.reserve_blocks(tier.pool.capacity)
        standby = sum(c.reclaimable for c in self._standby(model) if c.id != planning.id) if reserve else 0
        return Room(free_blocks=tier.pool.free_count + self._incoming(model), wanted_blocks=wanted,
                    reserve_blocks=reserve, standby_blocks=int(standby), turns_waiting=self.turns_waiting)

    def _standby(self, model: str) -> list:
        """Candidates the policy may park ahead of need (away for long, idle, on the device)."""
        tier = self.tiers[model]
        cands = [self._candidate(x) for x in tier.sessions.values()
                 if not x.pinned and x.kv_state is KVState.DEVICE and x.block_table]
        return [c for c in cands if self.policy.reclaimable(c)]

    def _reclaim(self, model: str) -> None:
        """Keep the policy's reserve of free device blocks: while the free blocks (counting parks
        in flight) are below it, park standby sessions in the policy's order, in the background.
        Only sessions that are away for long go this way; the rest leave on demand (``_room``)."""
        tier = self.tiers.get(model)
        if tier is None:
            return
        short = self.policy.reserve_blocks(tier.pool.capacity) - tier.pool.free_count - self._incoming(model)
        if short <= 0:
            return
        for c in self.policy.order(self._standby(model)):
            s = tier.sessions[c.id]
            self._park(s, allow_drop=False)
            if s.kv_state is KVState.PARKING:
                self.decisions["reclaimed"] += 1
                short -= c.reclaimable
                if short <= 0:
                    return

    def _count_decision(self, plan: WaitPlan) -> None:
        d = self.decisions
        d["io_wait"] += 1
        d[plan.outcome] += 1
        d["reasons"][plan.reason] = d["reasons"].get(plan.reason, 0) + 1
        d["sources"][plan.source or "none"] += 1
        if plan.action is Action.KEEP:
            d["keep_sources"][plan.source] += 1
        if plan.expected_s is not None and plan.outcome in d["expected_wait_s"]:
            d["expected_wait_s"][plan.outcome] += plan.expected_s

    def _note_evicted(self, s: Session) -> None:
        """Pressure wins over a keep: count a kept session evicted for room."""
        if s.wait_plan is not None and s.wait_plan.kept:
            s.wait_plan.kept = False
            self.decisions["kept_evicted"] += 1

    def _rates(self) -> CopyRates:
        """Copy bandwidth as measured so far, else the configured default."""
        copies = self.pager.stats()
        default = self.config.copy_gbps
        return CopyRates(out_gbps=copies[OUT]["gbps"] or default, in_gbps=copies[IN]["gbps"] or default)
