"""The engine loop's two channels: calls in order, signals ahead of every queued call."""

from __future__ import annotations

import threading

import pytest

from djinn.engine.loop import EngineLoop
from djinn.errors import Cancelled


def test_a_signal_runs_before_calls_queued_ahead_of_it():
    loop = EngineLoop()
    order, gate = [], threading.Event()
    try:
        running = loop.submit(gate.wait, 5)               # the call in progress when the signal comes
        queued = [loop.submit(order.append, f"call {i}") for i in range(3)]
        sig = loop.signal(order.append, "signal")
        gate.set()
        sig.result(5)
        for f in [running, *queued]:
            f.result(5)
        assert order == ["signal", "call 0", "call 1", "call 2"]
        st = loop.stats()["signal_delay_ms"]
        assert st["n"] == 1 and st["p50"] >= 0
    finally:
        loop.shutdown()


def test_an_idle_loop_runs_a_signal_at_once_and_errors_reach_the_caller():
    loop = EngineLoop()
    try:
        assert loop.signal(lambda: 7).result(5) == 7
        with pytest.raises(ZeroDivisionError):
            loop.signal(lambda: 1 / 0).result(5)
        assert loop.call(lambda: "still running") == "still running"
    finally:
        loop.shutdown()
    with pytest.raises(Cancelled):
        loop.signal(lambda: None).result(5)
