"""Deciding whose KV leaves the device: on a phase signal, and when room is needed.

This module only decides. It sees sessions as plain ``Candidate`` records (no tensors, no
sessions, no model, no clock: times come in as numbers), so every rule here is tested with
fakes (tests/memory/test_policy.py). Accounting lives in the block pool and the host arena,
moving bytes in ``memory.pager``, and ``engine.residency`` carries the decisions out (and owns
the clock and the timers).

Policies (``--policy``):

- ``semantic``: uses the client's signals, and weighs each ``IO_WAIT`` by how long it is
  expected to last (``plan_wait``):

  * expected length: the session's own history of IO_WAIT lengths (an exponentially weighted
    mean and mean deviation, as TCP estimates round-trip times), else a server-wide estimate
    (the median and median deviation of the last waits of all sessions), else unknown;
  * the cost of parking: ``park_s + restore_s`` for the session's bytes at the copy bandwidth
    the pager measured (a configured default until it has measured any), plus a margin for the
    prefetch to start early. Parking frees the memory only between the end of the park and the
    start of the prefetch, so a wait shorter than that break-even gains nothing from parking;
  * the memory is *needed* when a prefetch or a request waits for room, or when the device pool's free
    blocks (counting copies in flight) are below its reserve (``Room.reserve_blocks``, a share
    of the pool kept free so that arrivals never wait for an eviction) and parking the
    sessions that are away for long would not make that up;
  * KEEP when the expected wait is shorter than the break-even and the memory is not needed;
    PARK at once when the memory is needed; otherwise (a long wait, or nothing known about it)
    STANDBY: the KV stays on the device as the first to go. Whenever the free blocks fall below
    the reserve, the residency parks standby sessions in the background (``reclaim``), the one
    expected back last first (Belady's rule on the expected returns), so the copies that happen
    are the ones the memory needs, ahead of the requests that need it, and a long wait on a
    device with room moves nothing;
  * after a park, PREFETCH at ``expected - deviation - restore_s - margin`` from the start of the
    wait, so the agent that comes back finds its KV on the device (only into free room and while
    no prefetch waits for room: a prediction never evicts anyone nor takes room a request waits
    for); when a kept wait overruns its estimate (``mean + 4 x deviation + break-even``) and the
    KV is on the device, PARK it after all ("late park").

  ``ACTIVE`` brings parked KV back at once (prefetch ahead of the request). Under pressure,
  whole idle sessions are evicted in this order: sessions whose client said it is away
  (``IO_WAIT``, or ``PAUSED`` at a breakpoint waiting for a person), expected back last first
  (unknown, far overdue, and paused count as never); then idle ``ACTIVE`` sessions, least
  recently used first; last, ``IO_WAIT`` sessions due back soon: those kept for a short wait
  and those expected back within ``short_wait_s``. A keep is a bias, never a lock: a kept
  session is an eviction candidate like any other, only the last one, so no keep ever blocks an
  admission.
- ``semantic-park``: ``semantic`` with every IO_WAIT parked at once, whatever its expected length
  (no keep, no timed prefetch): the ablation of the wait estimate, and the policy of benchmarks
  that measure parking and restoring.
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

import collections
import enum
import statistics
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
    KEEP = "keep"              # IO_WAIT: leave the KV on the device (a short wait); pressure may still evict it
    STANDBY = "standby"        # IO_WAIT: leave the KV on the device as the first to go (a long wait, memory to spare)
    PARK = "park"              # copy to the host arena, free the device blocks when the copy is done
    DROP = "drop"              # free the KV now; recompute later
    PREFETCH = "prefetch"      # start bringing parked KV back to the device


@dataclass(frozen=True)
class WaitEstimate:
    """The expected length of one IO_WAIT: ``mean_s`` give or take ``dev_s``; ``source`` is
    ``session`` (its own history) or ``server`` (all sessions')."""

    mean_s: float
    dev_s: float
    source: str


@dataclass
class Candidate:
    """What a policy knows about one session."""

    id: str
    phase: str                         # ACTIVE | IO_WAIT | PAUSED
    state: KVState
    blocks: int                        # device blocks the session holds
    reclaimable: int                   # of those, blocks evicting it would free (not shared with a fork)
    idle_since: float                  # monotonic time the session last did anything
    expected_back_s: float | None = None   # IO_WAIT only: its expected wait minus the time waited so far
    kv_bytes: int = 0                  # bytes of its KV wherever it is (what a park or restore moves)
    waited_s: float = 0.0              # IO_WAIT only: seconds in this wait so far
    wait: WaitEstimate | None = None   # IO_WAIT only: the expected length of this wait, if anything is known
    kept: bool = False                 # IO_WAIT only: the policy chose to keep its KV for this wait
    host_blocks: int = 0               # host blocks it holds (what a restore needs on the device)


@dataclass(frozen=True)
class Room:
    """The device pool of the session's model when a wait is planned."""

    free_blocks: int                   # free now or once the copies in flight land
    wanted_blocks: int = 0             # blocks that prefetches are waiting for right now
    reserve_blocks: int = 0            # free blocks the pool keeps for arrivals (semantic's low-water mark)
    standby_blocks: int = 0            # blocks that reclaiming other standby sessions would free
    turns_waiting: int = 0             # requests queued for device room right now


@dataclass(frozen=True)
class CopyRates:
    """Copy bandwidth between the tiers (bytes/s as GB/s) and the fixed cost of one move."""

    out_gbps: float
    in_gbps: float
    overhead_s: float = 0.001

    def park_s(self, nbytes: int) -> float:
        return self.overhead_s + nbytes / (self.out_gbps * 1e9)

    def restore_s(self, nbytes: int) -> float:
        return self.overhead_s + nbytes / (self.in_gbps * 1e9)


@dataclass(frozen=True)
class WaitPlan:
    """What to do with one session's KV for one IO_WAIT. Times count from the wait's start."""

    action: Action                     # KEEP | PARK | DROP | NONE
    reason: str                        # why (a short word: the key of the decision counters)
    expected_s: float | None = None    # the expected wait used (None: nothing was known)
    source: str | None = None          # where it came from: session | server
    park_s: float = 0.0                # estimated copy times of the session's bytes
    restore_s: float = 0.0
    prefetch_at_s: float | None = None    # start the restore then (if the KV is off the device)
    recheck_at_s: float | None = None     # if still away then with the KV on the device, park it

    @property
    def outcome(self) -> str:
        """The decision counter this plan counts in: keep | standby | park | drop | off | none."""
        if self.action in (Action.KEEP, Action.STANDBY, Action.PARK, Action.DROP):
            return self.action.value
        return "off" if self.reason == "off_device" else "none"


class WaitHistory:
    """Lengths of IO_WAITs: per session an exponentially weighted mean and mean deviation
    (``update``, state kept by the caller), and server-wide the median and median absolute
    deviation of the last ``window`` waits of all sessions (``observe``)."""

    def __init__(self, gain: float = 0.5, dev_gain: float = 0.25, window: int = 64, min_samples: int = 3):
        self.gain, self.dev_gain, self.min_samples = gain, dev_gain, min_samples
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def update(self, mean: float | None, dev: float | None, waited: float) -> tuple[float, float]:
        """A session's (mean, deviation) after one more wait of ``waited`` seconds; also counts it
        server-wide."""
        self.recent.append(waited)
        if mean is None:
            return waited, waited / 2          # one sample: as unsure as TCP's first round trip
        dev = (1 - self.dev_gain) * (dev or 0.0) + self.dev_gain * abs(waited - mean)
        return (1 - self.gain) * mean + self.gain * waited, dev

    def server(self) -> WaitEstimate | None:
        if len(self.recent) < self.min_samples:
            return None
        xs = list(self.recent)
        med = statistics.median(xs)
        return WaitEstimate(med, statistics.median(abs(x - med) for x in xs), "server")

    def estimate(self, mean: float | None, dev: float | None) -> WaitEstimate | None:
        """The session's own estimate, else the server-wide one, else None."""
        if mean is not None:
            return WaitEstimate(mean, dev or 0.0, "session")
        return self.server()


class Policy:
    """Base class: the ``resident`` behaviour (never moves anything)."""

    name = "resident"
    moves_kv = False
    timed = False                      # its wait plans set timers (prefetch, recheck)

    def on_signal(self, c: Candidate) -> Action:
        """What to do right after the session's phase changed to ``c.phase``."""
        return Action.NONE

    def plan_wait(self, c: Candidate, room: Room, rates: CopyRates) -> WaitPlan:
        """What to do with ``c``'s KV for the IO_WAIT it just entered (or is still in)."""
        action = self.on_signal(c)
        return WaitPlan(action, "ignored" if action is Action.NONE else action.value)

    def on_wait_timer(self, c: Candidate, kind: str, room: Room) -> Action:
        """A timer of ``c``'s wait plan fired (``prefetch`` or ``recheck``): what to do now."""
        return Action.NONE

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        """Candidates, best victim first."""
        return sorted(candidates, key=lambda c: (c.idle_since, c.id))

    def reserve_blocks(self, capacity: int) -> int:
        """Free device blocks to keep for arrivals by parking idle sessions ahead of need
        (``reclaim``); 0: evict only on demand."""
        return 0

    def reclaimable(self, c: Candidate) -> bool:
        """Whether ``c`` may be parked ahead of need, to restore the reserve."""
        return False

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
    """``semantic``: see the module docstring. ``margin_s``: the least head start of a prefetch
    (at least half the restore time, for the estimate's error); ``reserve``: the share of the
    device pool kept free by parking standby sessions ahead of need."""

    name = "semantic"
    moves_kv = True
    timed = True

    def __init__(self, short_wait_s: float = 1.0, margin_s: float = 0.05, reserve: float = 0.1):
        self.short_wait_s = short_wait_s
        self.margin_s = margin_s
        self.reserve = reserve

    def on_signal(self, c: Candidate) -> Action:
        """Signals alone (no estimate of the wait): IO_WAIT parks, ACTIVE prefetches."""
        if c.phase == "IO_WAIT" and c.state in (KVState.DEVICE, KVState.RESTORING):
            return Action.PARK
        if c.phase == "ACTIVE" and c.state in (KVState.PARKING, KVState.PARKED):
            return Action.PREFETCH
        return Action.NONE

    def reserve_blocks(self, capacity: int) -> int:
        return int(capacity * self.reserve)

    def memory_needed(self, room: Room) -> bool:
        return room.wanted_blocks > 0 or room.turns_waiting > 0 or \
            room.free_blocks + room.standby_blocks < room.reserve_blocks

    def plan_wait(self, c: Candidate, room: Room, rates: CopyRates) -> WaitPlan:
        est = c.wait
        park_s, restore_s = rates.park_s(c.kv_bytes), rates.restore_s(c.kv_bytes)
        margin = max(self.margin_s, 0.5 * restore_s)
        known = {} if est is None else {"expected_s": est.mean_s, "source": est.source}
        times = {"park_s": park_s, "restore_s": restore_s, **known}
        prefetch = None if est is None else max(est.mean_s - est.dev_s - restore_s - margin, c.waited_s)
        off = c.state in (KVState.PARKING, KVState.PARKED, KVState.DROPPED)
        if off or (c.state is KVState.DEVICE and not c.blocks):
            if c.state is KVState.DEVICE or c.kv_bytes == 0:
                return WaitPlan(Action.NONE, "no_kv", **times)
            return WaitPlan(Action.NONE, "off_device",
                            prefetch_at_s=None if c.state is KVState.DROPPED else prefetch, **times)
        needed = self.memory_needed(room)
        if est is None:   # nothing known: the first to go, and parked now if the memory is needed
            return WaitPlan(Action.PARK if needed else Action.STANDBY, "no_estimate", **times)
        break_even = park_s + restore_s + margin
        remaining = est.mean_s - c.waited_s
        if remaining <= 0:
            return WaitPlan(Action.PARK, "overdue", **times)
        prefetch = max(prefetch, c.waited_s + park_s)        # not before a park now would end
        if needed:
            return WaitPlan(Action.PARK, "memory_needed", prefetch_at_s=prefetch, **times)
        if remaining < break_even:
            recheck = max(est.mean_s + 4 * est.dev_s + break_even, c.waited_s + break_even)
            return WaitPlan(Action.KEEP, "short", recheck_at_s=recheck, **times)
        return WaitPlan(Action.STANDBY, "long", prefetch_at_s=prefetch, **times)

    def on_wait_timer(self, c: Candidate, kind: str, room: Room) -> Action:
        if c.phase != "IO_WAIT":
            return Action.NONE
        if kind == "prefetch" and c.state in (KVState.PARKING, KVState.PARKED):
            # a prediction never takes room someone needs: not while a prefetch waits for room
            # (a park in flight may be the room a request waits for), and only into free blocks
            if room.wanted_blocks > 0 or room.turns_waiting > 0 or \
                    (c.state is KVState.PARKED and room.free_blocks < c.host_blocks):
                return Action.NONE
            return Action.PREFETCH
        if kind == "recheck" and (c.state is KVState.RESTORING or (c.state is KVState.DEVICE and c.blocks)):
            return Action.PARK                 # the wait overran its estimate: free the memory after all
        return Action.NONE

    def _back_s(self, c: Candidate) -> float:
        """Seconds until ``c`` is expected back; ``inf`` when nothing says it is coming back (no
        estimate, a wait far past its estimate, paused at a breakpoint)."""
        if c.phase != "IO_WAIT" or c.expected_back_s is None:
            return float("inf")
        if c.expected_back_s > 0:
            return c.expected_back_s
        if c.wait is not None and c.waited_s < c.wait.mean_s + 4 * c.wait.dev_s:
            return c.wait.dev_s                 # a little overdue: within its spread, back soon
        return float("inf")

    def _tier(self, c: Candidate) -> int:
        if c.phase == "IO_WAIT":
            back = self._back_s(c)
            return 2 if back != float("inf") and (c.kept or back < self.short_wait_s) else 0
        if c.phase == "PAUSED":
            return 0
        return 1

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        def key(c: Candidate):
            tier = self._tier(c)
            back = -self._back_s(c) if tier == 0 else 0.0    # away: expected back last, first
            return (tier, back, c.idle_since, c.id)
        return sorted(candidates, key=key)

    def reclaimable(self, c: Candidate) -> bool:
        return c.phase in ("IO_WAIT", "PAUSED") and self._tier(c) == 0


class SemanticPark(Semantic):
    """``semantic-park``: ``semantic`` without the wait estimate: every IO_WAIT parks at once (the
    signal alone; no keep, no timed prefetch, no late park), ACTIVE prefetches, the same victim
    order. The ablation of ``plan_wait``, and what benchmarks of the park/restore mechanism use
    (they need every IO_WAIT to park, however short)."""

    name = "semantic-park"
    timed = False

    def reserve_blocks(self, capacity: int) -> int:
        return 0

    def plan_wait(self, c: Candidate, room: Room, rates: CopyRates) -> WaitPlan:
        return Policy.plan_wait(self, c, room, rates)

    def on_wait_timer(self, c: Candidate, kind: str, room: Room) -> Action:
        return Action.NONE


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


POLICIES = {"semantic": Semantic, "lru": LRU, "recompute": Recompute, "resident": Resident,
            "semantic-park": SemanticPark}


def make_policy(name: str) -> Policy:
    from djinn.errors import InvalidRequest

    try:
        return POLICIES[name]()
    except KeyError:
        raise InvalidRequest(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}") from None
