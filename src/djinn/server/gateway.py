"""How the asyncio side calls the engine without blocking its event loop.

The engine already runs every call on its own loop thread (``engine.loop``) and hands back
a ``concurrent.futures.Future``; the gateway submits there and awaits that future through
``asyncio.wrap_future``, so a waiting request costs no thread (64 clients waiting on one
long generation are 64 futures, not 64 blocked threads) and a request that has not started
on the engine yet can still be cancelled (``cancel`` op, client gone, shutdown). A
request that has started runs to its end: the engine cannot be interrupted mid-step.

The engine's public methods, called on its loop thread, run inline (``EngineLoop.call``),
so this is the same code path as the embedded client's.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from djinn.engine import Engine


@dataclass
class EngineCall:
    """One submitted call: its future (for cancelling) and how long it queued."""

    future: Future | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None

    @property
    def queued_s(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted

    def cancel(self) -> bool:
        """Cancel if the engine has not started it; True if it will now never run."""
        return self.future is not None and self.future.cancel()


class EngineGateway:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def call(self, fn: Callable[..., Any], *args: Any, record: EngineCall | None = None, ticket=None,
                   **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the engine loop and await its result. ``ticket``: its
        place in the admitted queue (server/admission.py), given back when the engine starts it."""
        rec = record if record is not None else EngineCall()
        rec.submitted = time.perf_counter()

        def run() -> Any:
            rec.started = time.perf_counter()
            if ticket is not None:
                ticket.release()
            return fn(*args, **kwargs)

        rec.future = self.engine.loop.submit(run)
        if ticket is not None:
            ticket.watch(rec.future)
        # cancelling the awaiting task cancels rec.future too (wrap_future chains them);
        # that only succeeds while it is still queued
        result = await asyncio.wrap_future(rec.future)
        if isinstance(result, Future):   # work the engine finishes later (a batched turn)
            result = await asyncio.wrap_future(result)
        return result
