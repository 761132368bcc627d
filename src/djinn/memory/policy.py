"""Deciding whose KV leaves the device: on a phase signal, and when room is needed.

This module only decides. It sees sessions as plain ``Candidate`` records (no tensors, no
sessions, no model), so every rule here is tested with fakes (tests/memory/test_policy.py).
Accounting lives in the block pool and the host arena, moving bytes in ``memory.pager``, and
``engine.residency`` carries the decisions out.

Policies (``--policy``):

- ``semantic``: uses the client's signals. ``IO_WAIT`` parks the session's KV at once;
  ``ACTIVE`` brings it back ahead of the next request (prefetch). Under pressure, whole idle
  sessions are evicted in this order: sessions whose client said it is away (``IO_WAIT``, or
  ``PAUSED`` at a breakpoint waiting for a person), longest away first; then idle ``ACTIVE``
  sessions, least recently used first; last, ``IO_WAIT`` sessions whose own history of tool
  waits says they are due back within ``short_wait_s`` (a finished turn waiting for a person is
  a better victim than a short tool call).
- ``lru``: ignores signals; under pressure parks the least recently used idle sessions.
- ``recompute``: keeps nothing off the device: drops the KV on ``IO_WAIT`` and under pressure
  (least recently used first, ``IO_WAIT`` sessions before others); the next turn rebuilds it from
  the token history.
- ``resident``: never moves KV; a request that does not fit fails with ``CapacityError``.

Parking needs room in the host arena; a victim that does not fit there is dropped instead
(recomputed later), so a decision never fails for lack of host memory. A ``PAUSED`` session (a
forward stopped at a breakpoint) may be parked but never dropped: the KV its in-flight forward
already wrote is not in the token history, so it could not be recomputed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class KVState(str, enum.Enum):
    """Where one session's KV is. ``DEVICE`` with no blocks means no KV yet (or all trimmed)."""

    DEVICE = "device"          # in device blocks (possibly none yet)
    PARKING = "parking"        # device -> host copy in flight; the device blocks are still valid
    PARKED = "parked"          # in host blocks
    RESTORING = "restoring"    # host -> device copy in flight; the host blocks are still valid
    DROPPED = "dropped"        # nowhere: rebuilt from the token history by the next turn


class Action(str, enum.Enum):
    NONE = "none"
    PARK = "park"              # copy to the host arena, free the device blocks when the copy is done
    DROP = "drop"              # free the KV now; recompute later
    PREFETCH = "prefetch"      # start bringing parked KV back to the device


@dataclass
class Candidate:
    """What a policy knows about one session."""

    id: str
    phase: str                         # ACTIVE | IO_WAIT | PAUSED
    state: KVState
    blocks: int                        # device blocks the session holds
    reclaimable: int                   # of those, blocks evicting it would free (not shared with a fork)
    idle_since: float                  # monotonic time the session last did anything
    expected_back_s: float | None = None   # IO_WAIT only: its typical tool wait minus the time waited so far


class Policy:
    """Base class: the ``resident`` behaviour (never moves anything)."""

    name = "resident"
    moves_kv = False

    def on_signal(self, c: Candidate) -> Action:
        """What to do right after the session's phase changed to ``c.phase``."""
        return Action.NONE

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        """Candidates, best victim first."""
        return sorted(candidates, key=lambda c: (c.idle_since, c.id))

    def victim_action(self, c: Candidate, host_free: int) -> Action:
        return Action.PARK if c.blocks <= host_free else Action.DROP

    def victims(self, candidates: list[Candidate], need: int, host_free: int) -> list[tuple[str, Action]] | None:
        """Whole sessions to evict so that at least ``need`` device blocks come free.

        ``candidates`` are idle sessions on the device that may be moved; ``host_free`` is the
        room left in the host arena (in blocks). Returns ``(session id, PARK or DROP)`` pairs, or
        None when even evicting every candidate would not free ``need`` blocks (then nothing is
        evicted: the caller refuses the request instead of emptying the device for nothing).
        """
        if need <= 0:
            return []
        if not self.moves_kv or sum(c.reclaimable for c in candidates) < need:
            return None
        plan: list[tuple[str, Action]] = []
        freed = 0
        for c in self.order([c for c in candidates if c.reclaimable > 0]):
            action = self.victim_action(c, host_free)
            if action is Action.DROP and c.phase == "PAUSED":
                continue   # a paused forward's KV is not in the token history: it can be parked, never dropped
            if action is Action.PARK:
                host_free -= c.blocks
            plan.append((c.id, action))
            freed += c.reclaimable
            if freed >= need:
                return plan
        return None   # (only when paused sessions could not be parked)


class Resident(Policy):
    pass


class LRU(Policy):
    name = "lru"
    moves_kv = True


class Semantic(Policy):
    name = "semantic"
    moves_kv = True

    def __init__(self, short_wait_s: float = 1.0):
        self.short_wait_s = short_wait_s

    def on_signal(self, c: Candidate) -> Action:
        if c.phase == "IO_WAIT" and c.state in (KVState.DEVICE, KVState.RESTORING):
            return Action.PARK
        if c.phase == "ACTIVE" and c.state in (KVState.PARKING, KVState.PARKED):
            return Action.PREFETCH
        return Action.NONE

    def _tier(self, c: Candidate) -> int:
        if c.phase == "IO_WAIT":
            back = c.expected_back_s
            return 2 if back is not None and 0.0 < back < self.short_wait_s else 0
        if c.phase == "PAUSED":
            return 0
        return 1

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (self._tier(c), c.idle_since, c.id))


class Recompute(Policy):
    name = "recompute"
    moves_kv = True

    def on_signal(self, c: Candidate) -> Action:
        if c.phase == "IO_WAIT" and c.state is KVState.DEVICE and c.blocks > 0:
            return Action.DROP
        return Action.NONE

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (c.phase != "IO_WAIT", c.idle_since, c.id))

    def victim_action(self, c: Candidate, host_free: int) -> Action:
        return Action.DROP


POLICIES = {"semantic": Semantic, "lru": LRU, "recompute": Recompute, "resident": Resident}


def make_policy(name: str) -> Policy:
    from djinn.errors import InvalidRequest

    try:
        return POLICIES[name]()
    except KeyError:
        raise InvalidRequest(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}") from None
