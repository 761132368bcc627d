"""The engine loop: one thread owns the device and runs submitted work in order.

Any number of callers (embedded client, server connections) submit callables and wait on
futures; only the loop thread touches models, KV pools and sessions.

Two channels lead in. Calls (``submit``/``call``) run one at a time, one between two batch
steps. Signals (``signal``: phase changes, which start or cancel KV copies) have their own
channel, drained before every step and every call and at once when the loop is idle, so a
signal waits at most for the step or call running when it arrives, never behind queued calls.
The delay from a signal's arrival to its start is recorded (``stats()["signal_delay_ms"]``).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from djinn.errors import Cancelled

log = logging.getLogger("djinn.engine")


_WAKE = object()   # put on the call queue so an idle loop drains the signal channel at once


class EngineLoop:
    def __init__(self, name: str = "djinn-engine"):
        self._queue: queue.Queue = queue.Queue()
        self._signals: collections.deque = collections.deque()
        self.signal_delays: collections.deque = collections.deque(maxlen=4096)   # seconds, newest last
        self._stopping = False
        self._has_work: Callable[[], bool] = lambda: False
        self._step: Callable[[], None] = lambda: None
        # the slow-op log: every call or step that held the loop longer than SLOW_S (while it
        # runs, no other session advances), newest last: a latency tail's first suspect
        self.slow: collections.deque = collections.deque(maxlen=64)
        self.slow_total = 0
        # where the loop's time went: batch steps and submitted calls (the rest is idle);
        # with the batch sizes and the residency's room waits, a capacity limit's first clue
        self.busy_s = {"steps": 0.0, "calls": 0.0}
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> Future:
        fut: Future = Future()
        if self._stopping:
            fut.set_exception(Cancelled("the engine is shutting down"))
            return fut
        self._queue.put((fn, args, kwargs, fut))
        return fut

    def signal(self, fn: Callable[..., Any], *args, **kwargs) -> Future:
        """Run ``fn`` on the loop ahead of every queued call (see the module's doc)."""
        fut: Future = Future()
        if self._stopping:
            fut.set_exception(Cancelled("the engine is shutting down"))
            return fut
        self._signals.append((fn, args, kwargs, fut, time.perf_counter()))
        self._queue.put(_WAKE)
        return fut

    def _drain_signals(self) -> None:
        while self._signals:
            fn, args, kwargs, fut, since = self._signals.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            t = time.perf_counter()
            self.signal_delays.append(t - since)
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                fut.set_exception(exc)
            self._note("signal", t)

    def set_stepper(self, has_work: Callable[[], bool], step: Callable[[], None]) -> None:
        """Work the loop does whenever no submitted call is waiting: one step of the batch
        (``engine/batcher.py``). Submitted calls go first, one between two steps."""
        self._has_work, self._step = has_work, step

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn`` on the loop and wait for it (directly, if already on the loop)."""
        if self.in_loop():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    SLOW_S = 0.25

    def _note(self, what: str, started: float) -> None:
        took = time.perf_counter() - started
        self.busy_s["steps" if what == "step" else "calls"] += took
        if took >= self.SLOW_S:
            self.slow_total += 1
            self.slow.append({"at_s": round(started - self._t0, 3), "what": what, "ms": round(took * 1e3, 1)})

    def _run(self) -> None:
        while True:
            self._drain_signals()
            try:
                item = self._queue.get(block=not self._has_work())
            except queue.Empty:
                t = time.perf_counter()
                try:
                    self._step()
                except BaseException:  # pragma: no cover - the stepper fails its own turns
                    log.exception("engine step failed")
                self._note("step", t)
                continue
            if item is None:
                self._cancel_signals()
                return
            if item is _WAKE:
                continue
            fn, args, kwargs, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            t = time.perf_counter()
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # delivered to the caller, the loop keeps going
                fut.set_exception(exc)
            self._note(getattr(fn, "__qualname__", "call"), t)

    def stats(self) -> dict:
        """Seconds since the loop started, and of them busy in batch steps and in calls; the
        delay of recent signals from arrival to start (ms)."""
        delays = sorted(self.signal_delays)
        pick = (lambda q: round(delays[min(len(delays) - 1, int(q * len(delays)))] * 1e3, 3)) if delays else None
        return {"uptime_s": time.perf_counter() - self._t0, **{f"{k}_s": v for k, v in self.busy_s.items()},
                "signal_delay_ms": {"n": len(delays), "p50": pick and pick(0.5), "p99": pick and pick(0.99),
                                    "max": pick and pick(1.0)}}

    def _cancel_signals(self) -> None:
        while self._signals:
            fut = self._signals.popleft()[3]
            if fut.set_running_or_notify_cancel():
                fut.set_exception(Cancelled("the engine is shutting down"))

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

