"""Admission of turns that cannot start at once: the engine loop's background work besides the
batch step. A mixin of ``Engine`` (as ``KVMoves`` is of ``Residency``), split out to keep one
concept per file; ``submit_generate``'s ``start`` puts turns here and takes them back.

Two waits, both off the loop's critical path:
- **Room held by running turns** (``RoomHeld``): the turn waits, first come first served, for a
  running turn to end (``_deferred``). Only the head retries, after a batch step in which a turn
  ended, and while any waits, new turns queue behind it: were each retried, each would evict the
  KV the one before it just restored. Bounded by ``EngineConfig.room_wait_s``.
- **Its own restore in flight** (``CopyPending``): the turn is set aside (``_copying``), its
  session ``admitting`` (no policy moves it), and starts again after the step in which the copy
  is done, instead of the loop waiting 10-30 ms for the copy while every other turn stalls.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future


class Admission:
    """Mixin of ``Engine``: the turns waiting for room or for their restore (on the loop)."""

    def _init_admission(self) -> None:
        self._deferred: collections.deque = collections.deque()   # (start, its future, when submitted)
        self._copying: list = []     # (transfer, start, out, submitted): turns set aside for their restore
        self._retry_mark = -1

    def _has_work(self) -> bool:
        return self.batcher.has_work() or bool(self._deferred) or bool(self._copying)

    def _step(self) -> None:
        if self.batcher.has_work():
            self.batcher.step()
        self._start_copied()
        # retry the waiting turns in order once a turn ended (its blocks may be evicted now), or
        # at once when nothing runs any more (then the head succeeds or fails for good); stop at
        # the first that must wait again
        if self._deferred and (self.residency.turns_ended != self._retry_mark or not self.batcher.has_work()):
            self._retry_mark = self.residency.turns_ended
            while self._deferred:
                start, _out, _submitted = self._deferred.popleft()
                waiting = len(self._deferred)
                start(retry=True)
                if len(self._deferred) > waiting:      # it went back to the head
                    break
            self.residency.turns_waiting = len(self._deferred)

    def _start_copied(self) -> None:
        """Start again, in arrival order, the turns whose restore is done. With nothing else
        to run, wait for the oldest copy here (briefly: a new request may come meanwhile)
        rather than spin."""
        if not self._copying:
            return
        if not self.batcher.has_work() and not any(c[0].done() for c in self._copying):
            self._copying[0][0].wait_for(0.002)
        # each stays listed until it starts: a turn deferred meanwhile for room (RoomHeld) must
        # see that these sessions hold room about to run, not room that nothing will free
        for c in [c for c in self._copying if c[0].done()]:
            self._copying.remove(c)
            c[1](retry=True)

    def _defer(self, start, out: Future, submitted: float, head: bool) -> bool:
        """Keep a turn that found its room held by running turns (``RoomHeld``) for a retry
        after a batch step. False when waiting cannot help (nothing runs) or it waited
        ``EngineConfig.room_wait_s`` already: the caller fails it with the ``CapacityError``."""
        nothing_runs = not self.batcher.has_work() and not self._copying
        if nothing_runs or time.perf_counter() - submitted > self.config.room_wait_s:
            return False
        self._wait_for_room(start, out, submitted, head)
        return True

    def _wait_for_room(self, start, out: Future, submitted: float, head: bool) -> None:
        if head:
            self._deferred.appendleft((start, out, submitted))
        else:
            self._deferred.append((start, out, submitted))
        self.residency.turns_waiting = len(self._deferred)   # prefetches leave the room to them

    def _cancel_waiting(self, exc: BaseException) -> None:
        """Fail every waiting turn with ``exc`` (shutdown)."""
        waiting, self._deferred = self._deferred, collections.deque()
        if waiting:                               # (only an engine with a model has queued turns)
            self.residency.turns_waiting = 0
        copying, self._copying = self._copying, []
        for out in [w[1] for w in waiting] + [c[2] for c in copying]:
            out.set_exception(exc)
