"""Admission control of the native server: under overload, new work is refused at once with a
``CapacityError`` that says when to retry, instead of queueing without bound.

Owns the server's limits (``ServerConfig``; ``djinn serve --max-queued``,
``--max-sessions-per-key``, ``--max-tokens-per-request``; the request size limit is
``--max-message-size``, enforced by the frame reader):
- *queued work*: at most ``max_queued`` compute requests (generate, forward, resume, fetch)
  submitted to the engine and not yet started; one more is refused. A request counts from its
  submission until the engine starts it, or it is cancelled. So the engine's queue stays
  bounded and an admitted request waits for at most ``max_queued`` others.
- *sessions per principal*: ``session_open`` of a principal already owning
  ``max_sessions_per_key`` sessions is refused (closing one, or its lease ending, frees a place).
- *tokens per request*: a generate whose prompt plus ``max_new_tokens`` exceeds
  ``max_tokens_per_request`` is an InvalidRequest (retrying cannot help: it names the limit).

Runs on the server's asyncio loop, except ``Ticket.release`` and ``check_sessions``, which run
on the engine thread; the counters are guarded by a lock.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from djinn.errors import CapacityError, InvalidRequest

RETRY_AFTER_S = 1.0   # the hint in the error: about one turn of a loaded server


class Admission:
    def __init__(self, max_queued: int, max_sessions_per_key: int, max_tokens_per_request: int | None):
        self.max_queued = max_queued
        self.max_sessions_per_key = max_sessions_per_key
        self.max_tokens_per_request = max_tokens_per_request
        self._lock = threading.Lock()
        self.queued = 0
        self.high_water = 0
        self.rejected = {"queue": 0, "sessions": 0, "tokens": 0}

    # ---- queued work -----------------------------------------------------------------
    def admit(self) -> "Ticket":
        """A place in the engine's queue, or CapacityError at once."""
        with self._lock:
            if self.queued >= self.max_queued:
                self.rejected["queue"] += 1
                raise CapacityError(f"the server is at capacity: {self.queued} requests are waiting for the engine "
                                    f"(limit {self.max_queued}); retry after {RETRY_AFTER_S:g} s")
            self.queued += 1
            self.high_water = max(self.high_water, self.queued)
        return Ticket(self)

    def _leave(self) -> None:
        with self._lock:
            self.queued -= 1

    # ---- per request and per principal -------------------------------------------------
    def check_tokens(self, prompt, max_new_tokens: int) -> None:
        limit = self.max_tokens_per_request
        if limit is None:
            return
        # a text prompt counts its characters: tokenizing here would block the event loop, and a
        # token is at least one character for the tokenizers djinn loads, so this never under-counts
        n = len(prompt) + max_new_tokens
        if n > limit:
            with self._lock:
                self.rejected["tokens"] += 1
            raise InvalidRequest(f"the request asks for up to {n} tokens (prompt + max_new_tokens); this server "
                                 f"allows {limit} per request (--max-tokens-per-request)")

    def check_sessions(self, owned: int) -> None:
        if owned >= self.max_sessions_per_key:
            with self._lock:
                self.rejected["sessions"] += 1
            raise CapacityError(f"this key owns {owned} sessions, the most this server allows "
                                f"(--max-sessions-per-key {self.max_sessions_per_key}); close one first")

    def stats(self) -> dict:
        with self._lock:
            return {"queued": self.queued, "queued_high_water": self.high_water, "max_queued": self.max_queued,
                    "rejected": dict(self.rejected)}


class Ticket:
    """One admitted request's place: given back once, when the engine starts it or it ends unstarted."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._held = True
        self._lock = threading.Lock()

    def release(self, *_: object) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._admission._leave()

    def watch(self, future: Future) -> None:
        future.add_done_callback(self.release)   # cancelled or failed before starting: the place frees
