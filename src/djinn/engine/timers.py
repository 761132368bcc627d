"""Callbacks at monotonic deadlines, on one thread: the residency's wait-plan timers (start a
prefetch before an agent is expected back; park a kept session whose wait overran).

Owns a heap of ``(deadline, seq, callback)`` and the thread that runs the due ones. A callback
runs on the timer thread, outside any lock of this module; it must be short and must check
that what it was scheduled for still holds (callers invalidate instead of cancelling: a
cancelled handle is skipped when it comes due). ``clock`` and ``run_due`` let tests drive it
with a fake clock and no thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable


class Handle:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]):
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    def __init__(self, clock: Callable[[], float] = time.monotonic, thread: bool = True, name: str = "djinn-timers"):
        self.clock = clock
        self._heap: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def at(self, when: float, fn: Callable[[], None]) -> Handle:
        """Run ``fn`` at ``clock() >= when`` (at once if that has passed)."""
        h = Handle(when, fn)
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._seq), h))
            self._cv.notify()
        return h

    def pending(self) -> int:
        with self._cv:
            return sum(1 for _, _, h in self._heap if not h.cancelled)

    def _pop_due(self, now: float) -> list[Handle]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            h = heapq.heappop(self._heap)[2]
            if not h.cancelled:
                due.append(h)
        return due

    def run_due(self, now: float | None = None) -> int:
        """Run every callback due by ``now`` (default: the clock); returns how many ran."""
        with self._cv:
            due = self._pop_due(self.clock() if now is None else now)
        for h in due:
            h.fn()
        return len(due)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed:
                    now = self.clock()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cv.wait(None if not self._heap else self._heap[0][0] - now)
                if self._closed:
                    return
                due = self._pop_due(self.clock())
            for h in due:
                try:
                    h.fn()
                except Exception:  # pragma: no cover - a timer must never take the thread down
                    import logging

                    logging.getLogger("djinn").exception("timer callback failed")

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
