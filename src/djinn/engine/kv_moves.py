"""The moves of ``engine.residency.Residency``: parking a session's KV to the host arena,
restoring it, dropping it, calling a copy off, and settling finished copies.

Each move starts copies on the pager's streams and returns at once; the session's state
(``KVState``) says which copy is in flight, and ``Move`` records what settling it frees: the
source when it completed, the destination when it was called off. Everything here runs under
``Residency.lock`` and uses the residency's tiers, counters and ``_room``, so it is a mixin of
that class (as ``engine.wait_plans`` is), split out to keep one concept per file; it holds no
state of its own beyond what ``Residency.__init__`` sets up.
"""

from __future__ import annotations

from dataclasses import dataclass

from djinn.engine import sharing
from djinn.engine.session import Phase, Session
from djinn.errors import CapacityError
from djinn.memory.pager import IN, OUT, Transfer
from djinn.memory.policy import KVState


@dataclass(eq=False)
class Move:
    """One copy in flight between the tiers, and what settling it frees."""

    session: Session
    model: str
    kind: str                    # OUT (park) | IN (restore)
    device_blocks: list[int]
    host_blocks: list[int]
    transfer: Transfer
    cancelled: bool = False      # the session no longer wants the result



class KVMoves:
    """Mixin of ``Residency``: the moves of KV between the tiers (under its lock)."""

    def _park(self, s: Session, allow_drop: bool) -> None:
        if s.kv_state is KVState.RESTORING:
            self._cancel(s)                    # back to PARKED: the host copy is intact
            return
        if s.kv_state is not KVState.DEVICE or not s.block_table or s.pinned:
            return
        tier = self.tiers[s.model]
        n = len(s.block_table)
        # blocks whose content another parked session already holds on the host are shared, not copied
        bs = tier.pool.shape.block_size
        live = sharing.reshare(tier.arena, tier.host_prefix, s, n, bs) if tier.host_prefix is not None else {}
        todo = [j for j in range(n) if j not in live]
        if tier.arena.free_count < len(todo):
            tier.arena.release(list(live.values()))
            if allow_drop:
                self._drop(s)                  # no room on either tier: recompute later
            return
        fresh = tier.arena.allocate(len(todo))
        host = [live.get(j, 0) for j in range(n)]
        for j, b in zip(todo, fresh):
            host[j] = b
        tr = self.pager.park(tier.pool, [s.block_table[j] for j in todo], tier.arena, fresh, after=s.kv_ready)
        s.move = Move(s, s.model, OUT, list(s.block_table), host, tr)
        self.moves.append(s.move)
        s.kv_state = KVState.PARKING

    def _restore_need(self, s: Session) -> int:
        """Device blocks a restore of ``s`` would allocate now: its host blocks, less those whose
        content is live on the device (prefix sharing shares them instead of copying)."""
        tier = self.tiers[s.model]
        n = len(s.host_table)
        if tier.prefix is None:
            return n
        return n - sharing.live_count(tier.prefix, s, n, tier.pool.shape.block_size)

    def _start_restore(self, s: Session) -> bool:
        """Start copying ``s`` back; False (nothing started) if the device lacks the room."""
        tier = self.tiers[s.model]
        n = len(s.host_table)
        # blocks whose content is live on the device (prefix sharing) are shared, not copied back
        bs = tier.pool.shape.block_size
        live = sharing.reshare(tier.pool, tier.prefix, s, n, bs) if tier.prefix is not None else {}
        todo = [j for j in range(n) if j not in live]
        if len(todo) > tier.pool.free_count:
            if live:
                tier.pool.release(list(live.values()))
                tier.prefix.hits -= len(live)
            return False
        fresh = tier.pool.allocate(len(todo))
        dev = [live.get(j, 0) for j in range(n)]
        for j, b in zip(todo, fresh):
            dev[j] = b
        tr = self.pager.restore(tier.arena, [s.host_table[j] for j in todo], tier.pool, fresh)
        s.move = Move(s, s.model, IN, dev, list(s.host_table), tr)
        self.moves.append(s.move)
        s.kv_state = KVState.RESTORING
        s.prefetch_wanted = False
        return True

    def _prefetch(self, s: Session) -> None:
        """Start bringing ``s`` back without waiting for anything (making room as a request
        would), else as soon as room appears. Not while requests queue for room: its own request
        then takes its place in that queue (a prefetch that evicted could take the KV another
        waiting request just restored, and each would undo the other's work)."""
        if s.kv_state is KVState.PARKING:
            self._cancel(s)
            return
        if s.kv_state is not KVState.PARKED:
            return
        waiter = True
        if not self.turns_waiting:
            try:
                waiter = self._room(s.model, self._restore_need(s), {s.id})
            except CapacityError:
                pass                            # no room now: the request will try again
        if waiter is not None or not self._start_restore(s):
            s.prefetch_wanted = True
            self._wanted[s.id] = s

    def _drop(self, s: Session) -> None:
        if s.pinned or s.phase is Phase.PAUSED:   # a paused forward's KV cannot be recomputed
            return
        self._cancel(s)
        if not s.block_table and not s.host_table and s.num_cached == 0:
            return
        self._free_kv(s)
        if s.num_cached:
            s.rebuild_to = s.num_cached       # the engine recomputes this prefix before the next forward
        s.num_cached = 0
        s.kv_epoch += 1
        s.kv_state = KVState.DROPPED
        s.prefetch_wanted = False
        self.counters["dropped"] += 1

    def _free_kv(self, s: Session) -> None:
        """Free every block ``s`` holds on both tiers (a copy in flight must be called off first)."""
        tier = self.tiers[s.model]
        if s.block_table:
            tier.pool.release(s.block_table)
        if s.host_table:
            tier.arena.release(s.host_table)
        s.block_table.clear()
        s.host_table.clear()

    def _cancel(self, s: Session) -> None:
        """Give up ``s``'s copy in flight: it keeps its source; the destination is freed when the
        copy completes."""
        m = s.move
        if m is None:
            return
        m.cancelled = True
        s.move = None
        s.kv_state = KVState.DEVICE if m.kind == OUT else KVState.PARKED
        self.counters["cancelled"] += 1

    def _reap(self) -> None:
        """Settle every finished copy: free its source (or, if cancelled, its destination)."""
        if not self.moves:
            return
        still = []
        for m in self.moves:
            if not m.transfer.done():
                still.append(m)
                continue
            self.pager.account(m.transfer)
            tier = self.tiers[m.model]
            s = m.session
            if m.transfer.error is not None and not m.cancelled:
                self._cancel(s)                # a failed copy: the source is still valid, keep it
            if m.cancelled:
                if m.kind == OUT:
                    tier.arena.release(m.host_blocks)
                else:
                    tier.pool.release(m.device_blocks)
                continue
            s.move = None
            if m.kind == OUT:
                tier.pool.release(m.device_blocks)
                s.block_table.clear()
                s.host_table[:] = m.host_blocks
                s.kv_state = KVState.PARKED
                self.counters["parked"] += 1
                if tier.host_prefix is not None:          # later parks of the same blocks share these
                    sharing.publish_table(tier.host_prefix, s, s.host_table, tier.pool.shape.block_size)
            else:
                tier.arena.release(m.host_blocks)
                s.host_table.clear()
                s.block_table[:] = m.device_blocks       # in place: the same list object
                s.kv_state = KVState.DEVICE
                self.counters["restored"] += 1
                if tier.prefix is not None:               # the blocks copied back may serve others
                    sharing.publish_table(tier.prefix, s, s.block_table, tier.pool.shape.block_size)
            s.kv_epoch += 1
        self.moves = still

    def _start_wanted_prefetches(self) -> None:
        if self.turns_waiting:
            return                              # the room that appears is for the waiting turns
        for sid, s in list(self._wanted.items()):
            tier = self.tiers[s.model]
            if not s.prefetch_wanted or s.kv_state is not KVState.PARKED or sid not in tier.sessions:
                s.prefetch_wanted = False
                del self._wanted[sid]
            elif not s.busy and tier.pool.free_count >= self._restore_need(s) and self._start_restore(s):
                del self._wanted[sid]
