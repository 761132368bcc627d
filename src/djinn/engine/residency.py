"""Where each session's KV lives, and the moves between the device pool and the host arena.

Sequences what the policy decides (``memory.policy``), what the pool and the arena account
(``memory.blocks``, ``memory.host``) and what the pager copies (``memory.pager``)::

    DEVICE --park--> PARKING --copy done--> PARKED --restore--> RESTORING --copy done--> DEVICE
    DEVICE | PARKED --drop--> DROPPED --the next turn recomputes it from the tokens--> DEVICE
    PARKING --ACTIVE / a request--> DEVICE      (the device copy is still intact: no restore)
    RESTORING --IO_WAIT--> PARKED              (the host copy is still intact)

Invariants, all under ``self.lock``:
- a block is freed only when no copy reads or writes it any more: a park frees its device
  blocks, a restore its host blocks, after the copy's event completed (``_reap``); a cancelled
  move frees its *destination* then, and its source stays with the session;
- a session that is ``busy`` (its turn is running) is never moved; a phase signal that arrives
  meanwhile takes effect when the turn ends;
- a restore refills ``session.block_table`` in place and bumps ``session.kv_epoch``;
- nothing here blocks while holding the lock: waiting for a copy happens outside it;
- blocks may be shared by forks (reference counts in the pool and the arena): a release drops
  one reference, a shared block is never written (``grow`` copies it first), parking a session
  copies its own view of a shared block and frees only what no other session holds, and a fork
  of a parked session shares its host blocks;
- with prefix sharing (``engine.sharing``, ``memory.prefix``), blocks are also shared by content:
  a turn takes indexed blocks for its prompt before reserving the rest, a finished turn indexes
  its full blocks, a park shares host blocks whose content is already parked and a restore
  shares device blocks whose content is live, so a common prefix is stored and moved once; an
  indexed block leaves its index when freed or before ``grow`` lets anything write into it.

What happens during an IO_WAIT (keep, standby or park, the reserve, timed prefetch) is
``engine.wait_plans``, the moves themselves (park, restore, drop, cancel, settling finished
copies) are ``engine.kv_moves``, and making room (the policy's candidates and victims, and what
to wait for when no room can be made now) is ``engine.room``: mixins of this class.

Threads: the engine loop (turns, open, close), callers of ``signal`` (``signal_phase`` must return
at once, so it does not queue behind a running turn on the loop), the pager's copy threads or
streams, and the host arena's grower. Blocks are freed only when no queued GPU work uses them:
the loop waits for every step's sampled token, and parks free their source after their event.

The API a step scheduler needs is ``make_room(model, blocks, protect)``, ``ensure_resident(s)``
and ``grow(s, tokens)``; the one-request-at-a-time loop calls them through ``begin_turn``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from djinn.config import MemoryConfig
from djinn.engine import sharing
from djinn.engine.session import Phase, Session
from djinn.engine.timers import Timers
from djinn.engine.kv_moves import KVMoves, Move
from djinn.engine.room import CopyPending, Room
from djinn.engine.wait_plans import WaitPlanning
from djinn.errors import InvalidRequest, SessionNotFound
from djinn.memory.blocks import BlockPool
from djinn.memory.cow import copy_blocks, privatize, shared_in_range
from djinn.memory.host import HostArena
from djinn.memory.pager import IN, OUT, Pager, Transfer
from djinn.memory.policy import Action, KVState, Semantic, WaitHistory, make_policy
from djinn.memory.prefix import PrefixIndex


@dataclass
class _Tier:
    """One model's two tiers and its sessions."""

    pool: BlockPool
    arena: HostArena
    sessions: dict[str, Session] = field(default_factory=dict)
    prefix: PrefixIndex | None = None      # automatic prefix sharing (engine/sharing.py), None when off
    host_prefix: PrefixIndex | None = None # the same for parked KV in the host arena


class Residency(WaitPlanning, KVMoves, Room):
    def __init__(self, config: MemoryConfig, device: torch.device, prefix_sharing: bool = True):
        self.config = config
        self.prefix_sharing = prefix_sharing
        self.device = torch.device(device)
        self.policy = make_policy(config.policy)
        self.pager = Pager(self.device)
        self.lock = threading.RLock()
        self.tiers: dict[str, _Tier] = {}
        self.moves: list[Move] = []
        self._wanted: dict[str, Session] = {}      # prefetches waiting for device room, in order
        self.counters = {"parked": 0, "restored": 0, "dropped": 0, "recomputed": 0, "cancelled": 0,
                         "forks": 0, "cow_copies": 0}
        # the caller (the engine loop) waiting: for copies (room, its restore), for the lock
        self.blocked_s = {"room": 0.0, "restore": 0.0, "lock": 0.0}
        # IO_WAIT decisions (engine.wait_plans), what the wait timers did, and the waits seen
        self.clock = time.monotonic
        self.waits = WaitHistory()
        self.decisions: dict = {"io_wait": 0, "keep": 0, "standby": 0, "park": 0, "drop": 0, "off": 0, "none": 0,
                                "reasons": {}, "sources": {"session": 0, "server": 0, "none": 0},
                                "keep_sources": {"session": 0, "server": 0},
                                "expected_wait_s": {"keep": 0.0, "standby": 0.0, "park": 0.0},
                                "prefetch": 0, "prefetch_no_room": 0, "late_park": 0, "kept_evicted": 0,
                                "reclaimed": 0}
        # engine.timers.Timers of the wait plans: started now under a policy that times them (so
        # the server's set of threads is fixed from the start), else by the first timed plan
        self._timers = Timers(clock=self.clock, name="djinn-wait-timers") if self.policy.timed else None
        self.turns_ended = 0                          # end_turn calls so far (room may have come free)
        self.turns_waiting = 0                        # turns queued for room (set by Engine): prefetches wait

    # ---- set-up -----------------------------------------------------------------------
    def add_model(self, name: str, pool: BlockPool, host_blocks: int) -> HostArena:
        pin = pool.device.type == "cuda"
        arena = HostArena(pool.shape, host_blocks, pin=pin, chunk_bytes=self.config.host_chunk_bytes)
        with self.lock:
            self.tiers[name] = _Tier(pool, arena)
            if self.prefix_sharing:
                tier = self.tiers[name]
                tier.prefix, tier.host_prefix = PrefixIndex(), PrefixIndex()
                pool.on_free = tier.prefix.forget          # a freed block no longer holds its key's KV
                arena.on_free = tier.host_prefix.forget
        return arena

    def register(self, s: Session) -> None:
        with self.lock:
            self.tiers[s.model].sessions[s.id] = s

    def release(self, s: Session) -> None:
        """Forget a closing session and free all it holds (a copy in flight frees its
        destination when it completes)."""
        with self.lock:
            self._cancel(s)
            self._free_kv(s)
            s.num_cached = 0
            s.rebuild_to = 0
            s.kv_state = KVState.DEVICE
            self.tiers[s.model].sessions.pop(s.id, None)

    def truncate(self, s: Session, length: int) -> None:
        """Keep only the KV of the first ``length`` tokens, wherever it is (a copy in flight is
        called off first: its source is intact)."""
        with self.lock:
            tier = self.tiers[s.model]
            self._cancel(s)
            s.num_cached = min(s.num_cached, length)
            s.rebuild_to = min(s.rebuild_to, length)
            keep = tier.pool.shape.blocks_for(s.num_cached)
            for table, owner in ((s.block_table, tier.pool), (s.host_table, tier.arena)):
                if len(table) > keep:
                    owner.release(table[keep:])
                    del table[keep:]

    # ---- where ------------------------------------------------------------------------
    def location(self, s: Session) -> str:
        """``device`` | ``host`` | ``moving`` | ``dropped`` | ``none`` (no KV yet)."""
        with self.lock:
            self._reap()                        # copies that finished show where they landed
            st = s.kv_state
            if st in (KVState.PARKING, KVState.RESTORING):
                return "moving"
            if st is KVState.PARKED:
                return "host"
            if st is KVState.DROPPED:
                return "dropped"
            if s.block_table:
                return "device"
            return "dropped" if s.tokens else "none"

    # ---- signals (any thread) ---------------------------------------------------------
    def signal(self, s: Session, phase: Phase) -> None:
        """Record the phase and start whatever copy the policy wants; returns at once."""
        with self.lock:
            if s.id not in self.tiers[s.model].sessions or s.closed:
                raise SessionNotFound(f"no session {s.id!r}: it was closed")
            if s.phase is Phase.PAUSED:
                self._signal_paused(s, phase)
                return
            self._set_phase(s, phase)
            if not s.busy:
                self._apply_signal(s)
                self._start_wanted_prefetches()

    def _signal_paused(self, s: Session, phase: Phase) -> None:
        """A session paused at a breakpoint stays paused: the signal only says where its KV
        should be while the person (or program) holding the breakpoint thinks. ``IO_WAIT``
        parks it now (never drops: the paused forward's KV is not in the token history) and
        ``ACTIVE`` brings it back ahead of ``resume``, under the policies that use signals;
        the others ignore it, as they ignore every signal."""
        if not isinstance(self.policy, Semantic) or s.busy:
            return
        if phase is Phase.IO_WAIT:
            self._park(s, allow_drop=False)
        else:
            self._prefetch(s)
            self._start_wanted_prefetches()

    def _set_phase(self, s: Session, phase: Phase) -> None:
        now = self.clock()
        if s.phase is Phase.IO_WAIT and phase is not Phase.IO_WAIT:
            s.wait_ema, s.wait_dev = self.waits.update(s.wait_ema, s.wait_dev, now - s.phase_since)
            if s.wait_plan is not None:
                s.wait_plan.cancel()
                s.wait_plan = None
        if phase is not s.phase:
            s.phase_since = now
        s.phase = phase
        if phase is not Phase.ACTIVE:
            s.prefetch_wanted = False

    def _apply_signal(self, s: Session) -> None:
        if s.phase is Phase.IO_WAIT:
            self._plan_wait(s)
            return
        action = self.policy.on_signal(self._candidate(s))
        if action is Action.PARK:
            self._park(s, allow_drop=False)
        elif action is Action.DROP:
            self._drop(s)
        elif action is Action.PREFETCH:
            self._prefetch(s)

    # ---- turns (engine loop) ----------------------------------------------------------
    def begin_turn(self, s: Session, tokens: int, activate: bool = True, wait: bool = True) -> dict:
        """Mark ``s`` busy, bring its KV to the device and reserve blocks for ``tokens`` tokens.
        ``activate``: a generate request means the client is back, so an ``IO_WAIT`` session
        becomes ``ACTIVE``; a white-box forward leaves the phase as it was. ``wait=False``: raise
        ``CopyPending`` rather than wait for the session's restore (the session is then
        ``admitting``: no policy moves it until the turn starts again).

        Returns the memory timings of the turn. On error the session is left as it was (not
        busy; its KV wherever it was) and the error is a ``CapacityError``.
        """
        with self._loop_lock():
            if s.busy:
                raise InvalidRequest("a turn is already running on this session")
            s.busy = True
            s.admitting = False
            if activate and s.phase is Phase.IO_WAIT:
                self._set_phase(s, Phase.ACTIVE)
        t0 = time.perf_counter()
        try:
            source, room_s = self.ensure_resident(s, wait)
            room_s += self.grow(s, tokens)
        except BaseException as exc:
            with self._loop_lock():
                s.busy = False
                s.admitting = isinstance(exc, CopyPending)
            raise
        return {"restore_ms": (time.perf_counter() - t0) * 1e3, "make_room_ms": room_s * 1e3, "kv_from": source}

    def end_turn(self, s: Session) -> None:
        """The turn ended (well or not): return blocks beyond the cached tokens, record the compute
        the next park must wait for, and apply a phase signal that came meanwhile."""
        with self._loop_lock():
            tier = self.tiers.get(s.model)
            s.busy = False
            s.touch()
            self.turns_ended += 1
            if tier is None or s.id not in tier.sessions:
                return
            keep = tier.pool.shape.blocks_for(s.num_cached)
            if len(s.block_table) > keep:
                extra = s.block_table[keep:]
                del s.block_table[keep:]
                tier.pool.release(extra)
            if tier.prefix is not None and s.kv_state is KVState.DEVICE:
                sharing.publish(tier.pool, tier.prefix, s)   # its full blocks may serve other sessions
            if self.pager.cuda:
                s.kv_ready = torch.cuda.current_stream(self.device).record_event()
            self._reap()
            if s.phase is not Phase.ACTIVE:
                self._apply_signal(s)
            self._start_wanted_prefetches()
            self._reclaim(s.model)        # the turn's blocks may have eaten into the reserve

    def pause_turn(self, s: Session) -> None:
        """The turn stopped at a breakpoint (white-box): the session is idle until resumed, so
        its KV may be parked meanwhile; it keeps every block its in-flight forward uses (they
        move with it). ``resume_turn`` brings them back before the forward continues."""
        with self.lock:
            s.busy = False
            s.touch()
            if self.pager.cuda:
                s.kv_ready = torch.cuda.current_stream(self.device).record_event()

    def resume_turn(self, s: Session) -> float:
        """Mark a paused session busy again and bring its KV back (in place: a paused forward's
        ``PagedCache`` must then ``rebind`` to ``s.block_table``). Returns the seconds waited."""
        with self.lock:
            if s.busy:
                raise InvalidRequest("a turn is already running on this session")
            s.busy = True
        t0 = time.perf_counter()
        try:
            self.ensure_resident(s)
        except BaseException:
            with self.lock:
                s.busy = False
            raise
        return time.perf_counter() - t0

    # ---- the step-scheduler API -------------------------------------------------------
    def ensure_resident(self, s: Session, wait: bool = True) -> tuple[str, float]:
        """Bring ``s``'s KV to the device, waiting only for its own restore (and for room it
        needs); with ``wait=False`` raise ``CopyPending`` instead of waiting for its restore (room
        is still waited for: a turn set aside after evicting for its room could see the room go
        to another turn, and the two would evict each other's KV in turn). Returns where the KV
        came from (``device`` | ``host`` | ``recompute``) and the seconds spent waiting for room."""
        source, room_s = "device", 0.0
        while True:
            for_room = False
            with self._loop_lock():
                self._reap()
                st = s.kv_state
                if st is KVState.DEVICE:
                    return source, room_s
                if st is KVState.DROPPED:
                    s.kv_state = KVState.DEVICE
                    self.counters["recomputed"] += 1
                    return "recompute", room_s
                if st is KVState.PARKING:
                    self._cancel(s)            # the device blocks are intact: nothing to copy back
                    return source, room_s
                source = "host"
                if st is KVState.PARKED:
                    waiter = self._room(s.model, self._restore_need(s), {s.id})
                    if waiter is None:
                        if not self._start_restore(s):
                            continue               # a shared block went meanwhile: ask for room again
                        waiter = s.move.transfer
                    else:
                        for_room = True
                else:  # RESTORING
                    waiter = s.move.transfer
            if not wait and not for_room:
                raise CopyPending(waiter)
            waited = self._block_on(waiter, "room" if for_room else "restore")
            if for_room:
                room_s += waited

    def grow(self, s: Session, tokens: int) -> float:
        """Give ``s`` blocks for ``tokens`` tokens, evicting idle sessions if needed, and make
        every block its next forward writes (positions ``num_cached .. tokens - 1``) private:
        a block shared with a fork is copied first (copy-on-write, ``memory.cow``). Every
        forward path (single-session and batched) calls this before writing K/V. Returns the
        seconds spent waiting for room."""
        waited = 0.0
        while True:
            with self._loop_lock():
                tier = self.tiers[s.model]
                pool = tier.pool
                extend = max(0, pool.shape.blocks_for(tokens) - len(s.block_table))
                if tier.prefix is not None and tokens > s.num_cached:
                    # an indexed block about to be written (after a truncation) leaves the index
                    bs = pool.shape.block_size
                    tier.prefix.forget_many(b for b in s.block_table[s.num_cached // bs:]
                                            if pool.refcount(b) == 1)
                shared = shared_in_range(pool, s.block_table, s.num_cached, tokens)
                if extend + len(shared) == 0:
                    return waited
                waiter = self._room(s.model, extend + len(shared), {s.id})
                if waiter is None:
                    # _room settled finished copies: a parked sharer may have left a block private
                    shared = shared_in_range(pool, s.block_table, s.num_cached, tokens)
                    fresh = pool.allocate(extend + len(shared))
                    if shared:
                        privatize(pool, s.block_table, shared, fresh[:len(shared)])
                        s.kv_epoch += 1
                        self.counters["cow_copies"] += len(shared)
                    s.block_table.extend(fresh[len(shared):])
                    return waited
            waited += self._block_on(waiter, "room")

    def share_prefix(self, s: Session, end: int, lookup: bool = True, taint: bool = False) -> int:
        """Automatic prefix sharing before a forward of ``tokens[num_cached:end]`` (blocks
        reserved by ``begin_turn``): full blocks whose content another session holds on the device
        are shared and skipped (``engine.sharing.take``). ``taint``: this forward changes K/V
        (an intervention), so nothing from here on is shared; ``lookup`` False: the forward must
        compute every token itself (white-box). Returns the tokens skipped."""
        with self.lock:
            if taint:
                sharing.taint(s)
            tier = self.tiers[s.model]
            if tier.prefix is None or not lookup or s.kv_state is not KVState.DEVICE:
                return 0
            return sharing.take(tier.pool, tier.prefix, s, end)

    def fork(self, parent: Session, child: Session, inflight: int = 0) -> None:
        """Give ``child`` (new, unregistered) ``parent``'s KV without copying it: device blocks
        and parked host blocks are shared (reference counts), a dropped parent's fork is
        dropped too (it recomputes the same prefix). ``inflight``: tokens past ``num_cached``
        whose K/V a paused forward already wrote (layers up to its breakpoint); the blocks
        holding them are copied, not shared, because the parent's forward goes on writing
        them. A copy in flight of the parent is waited for first, so the fork starts from a
        settled state. Sets the child's ``block_table``/``host_table``, ``num_cached``,
        ``rebuild_to``, ``kv_state`` and registers it."""
        while True:
            with self.lock:
                self._reap()
                if parent.move is not None:
                    waiter = parent.move.transfer
                else:
                    waiter = self._fork_settled(parent, child, inflight)
                    if waiter is None:
                        return
            waiter.wait()

    def _fork_settled(self, parent: Session, child: Session, inflight: int) -> Transfer | None:
        tier = self.tiers[parent.model]
        pool = tier.pool
        child.num_cached, child.rebuild_to = parent.num_cached, parent.rebuild_to
        child.kv_ready = parent.kv_ready
        child.kv_clean_to = parent.kv_clean_to
        st = parent.kv_state
        if st is KVState.PARKED:
            tier.arena.share(parent.host_table)   # parked KV is only read (by restores): share it all
            child.host_table = list(parent.host_table)
            child.block_table = []
        elif st is KVState.DROPPED:
            child.block_table, child.host_table = [], []
        else:
            bs = pool.shape.block_size
            if inflight:
                keep = parent.num_cached // bs
                copy = parent.block_table[keep:pool.shape.blocks_for(parent.num_cached + inflight)]
            else:
                keep, copy = pool.shape.blocks_for(parent.num_cached), []
            if copy:
                waiter = self._room(parent.model, len(copy), {parent.id, child.id})
                if waiter is not None:
                    return waiter
            shared = parent.block_table[:keep]
            fresh = pool.allocate(len(copy)) if copy else []
            copy_blocks(pool, copy, fresh)
            pool.share(shared)
            child.block_table = shared + fresh
            child.host_table = []
            if copy and self.pager.cuda:
                child.kv_ready = torch.cuda.current_stream(self.device).record_event()
        child.kv_state = st
        child.kv_epoch = 0
        tier.sessions[child.id] = child
        self.counters["forks"] += 1
        return None

    def wait_idle(self, s: Session | None = None, timeout: float | None = None) -> None:
        """Wait until ``s``'s copy (or every copy) finished and was accounted for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                self._reap()
                self._start_wanted_prefetches()
                pending = [m for m in self.moves if s is None or m.session is s]
                if not pending:
                    return
                tr = pending[0].transfer
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("copies still in flight")
            tr.wait()

    # ---- accounting -------------------------------------------------------------------
    @contextlib.contextmanager
    def _loop_lock(self):
        """The lock, taken by the engine loop's calls (turns, growing a turn's blocks), with the
        time spent waiting for it counted (``blocked_s["lock"]``): another thread holding it
        (a signal parking a session, a wait timer) holds up every running turn meanwhile."""
        t = time.perf_counter()
        with self.lock:
            self.blocked_s["lock"] += time.perf_counter() - t
            yield

    def stats(self) -> dict:
        with self.lock:
            self._reap()
            self._start_wanted_prefetches()
            where: dict[str, int] = {}
            moving = 0
            for tier in self.tiers.values():
                for s in tier.sessions.values():
                    loc = self.location(s)
                    where[loc] = where.get(loc, 0) + 1
            for m in self.moves:
                if not m.cancelled:
                    moving += m.transfer.nbytes
            copies = self.pager.stats()
            used = sum(t.pool.used_count for t in self.tiers.values())
            shared = sum(t.pool.shared_count for t in self.tiers.values())
            logical = sum(t.pool.logical_count for t in self.tiers.values())
            sharing = {
                "kv_shared": sum(t.pool.shared_count * t.pool.shape.block_bytes for t in self.tiers.values()),
                "kv_unshared_equivalent": sum(t.pool.logical_count * t.pool.shape.block_bytes
                                              for t in self.tiers.values()),
                "shared_blocks": shared,
                # logical KV (what the holders would need unshared) / physical KV (device blocks held)
                "sharing_ratio": logical / used if used else 1.0,
                "shared_fraction": shared / used if used else 0.0,   # of the device blocks held, shared ones
                "forks": self.counters["forks"], "cow_copies": self.counters["cow_copies"],
                "prefix_sharing": self.prefix_sharing,
                "prefix_indexed_blocks": sum(len(t.prefix) for t in self.tiers.values() if t.prefix is not None),
                "prefix_hits": sum(t.prefix.hits for t in self.tiers.values() if t.prefix is not None),
                "prefix_host_hits": sum(t.host_prefix.hits for t in self.tiers.values() if t.host_prefix is not None),
                "prefix_deduped": sum(t.prefix.deduped for t in self.tiers.values() if t.prefix is not None),
            }
            return {
                "sharing": sharing,
                "policy": self.policy.name,
                "kv_device": sum(t.pool.used_bytes for t in self.tiers.values()),
                "kv_device_capacity": sum(t.pool.capacity * t.pool.shape.block_bytes for t in self.tiers.values()),
                "kv_device_high_water": sum(t.pool.high_water * t.pool.shape.block_bytes for t in self.tiers.values()),
                "kv_parked": sum(t.arena.used_bytes for t in self.tiers.values()),
                "kv_host_capacity": sum(t.arena.total_bytes for t in self.tiers.values()),
                "kv_host_target": sum(t.arena.target_bytes for t in self.tiers.values()),
                "host_arena_ready": all(t.arena.ready for t in self.tiers.values()),
                "kv_moving": moving,
                "sessions_by_kv_location": where,
                "swaps": {"out": self.counters["parked"], "in": self.counters["restored"],
                          "dropped": self.counters["dropped"], "recomputed": self.counters["recomputed"],
                          "cancelled": self.counters["cancelled"]},
                "bytes_moved": {"out": copies[OUT]["bytes"], "in": copies[IN]["bytes"]},
                "bandwidth_gbps": {"out": copies[OUT]["gbps"], "in": copies[IN]["gbps"]},
                "copy_calls": {"out": copies[OUT]["copy_calls"], "in": copies[IN]["copy_calls"],
                               "transfers_out": copies[OUT]["transfers"], "transfers_in": copies[IN]["transfers"]},
                "decisions": _copy(self.decisions),
                "blocked_s": dict(self.blocked_s),
                "wait_estimate_s": (lambda e: None if e is None else {"mean": e.mean_s, "dev": e.dev_s})(
                    self.waits.server()),
            }

    def close(self) -> None:
        try:
            self.wait_idle(timeout=60)
        except TimeoutError:  # pragma: no cover
            pass
        if self._timers is not None:
            self._timers.close()
        self.pager.close()
        for tier in self.tiers.values():
            tier.arena.close()


def _copy(d: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}
