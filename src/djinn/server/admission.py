"""Admission control of the native server: under overload, new work is refused at once with a
``CapacityError`` that says when to retry, instead of queueing without bound.

Owns the server's limits (``ServerConfig``; ``djinn serve --max-queued``,
``--max-sessions-per-key``, ``--max-tokens-per-request``; the request size limit is
``--max-message-size``, enforced by the frame reader):
- *queued work*: at most ``max_queued`` compute requests (generate, forward, resume, fetch)
  submitted to the engine and not yet started; one more is refused. A request counts from its
  submission until the engine starts it, or it is cancelled. So the engine's queue stays
  bounded and an admitted request waits for at most ``max_queued`` others.
- *running generates*: starting a plain generate only hands it to the batcher (engine/batcher.py),
  where it runs with the others until its last token, so the queue bound alone would let any
  number of turns into the batch: at most ``max_running`` generates of this server are admitted
  and not finished (queued or running; default the engine's ``max_batch``, so every running
  turn gets a decode in every step). A generate counts from admission to its reply.
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
    def __init__(self, max_queued: int, max_sessions_per_key: int, max_tokens_per_request: int | None,
                 max_running: int | None = None):
        self.max_queued = max_queued
        self.max_running = max_running
        self.max_sessions_per_key = max_sessions_per_key
        self.max_tokens_per_request = max_tokens_per_request
        self._lock = threading.Lock()
        self.queued = 0
        self.high_water = 0
        self.running = 0                     # generates admitted and not finished
        self.running_high_water = 0
        self.rejected = {"queue": 0, "running": 0, "sessions": 0, "tokens": 0}

    # ---- queued work -----------------------------------------------------------------
    def admit(self, turn: bool = False) -> "Ticket":
        """A place in the engine's queue (and, for a generate ``turn``, in the running set), or
        CapacityError at once."""
        with self._lock:
            if self.queued >= self.max_queued:
                self.rejected["queue"] += 1
                raise CapacityError(f"the server is at capacity: {self.queued} requests are waiting for the engine "
                                    f"(limit {self.max_queued}); retry after {RETRY_AFTER_S:g} s")
            if turn and self.max_running is not None and self.running >= self.max_running:
                self.rejected["running"] += 1
                raise CapacityError(f"the server is at capacity: {self.running} generations are running "
                                    f"(limit {self.max_running}); retry after {RETRY_AFTER_S:g} s")
            self.queued += 1
            self.high_water = max(self.high_water, self.queued)
            if turn:
                self.running += 1
                self.running_high_water = max(self.running_high_water, self.running)
        return Ticket(self, turn)

    def _leave(self) -> None:
        with self._lock:
            self.queued -= 1

    def _finish(self) -> None:
        with self._lock:
            self.running -= 1

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
                    "running": self.running, "running_high_water": self.running_high_water,
                    "max_running": self.max_running,
                    "rejected": dict(self.rejected)}


class Ticket:
    """One admitted request's place: its queue place given back once, when the engine starts it
    or it ends unstarted (``release``); a generate's running place once, when it ends (``finish``)."""

    def __init__(self, admission: Admission, turn: bool = False):
        self._admission = admission
        self._held = True
        self._running = turn
        self._lock = threading.Lock()

    def release(self, *_: object) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._admission._leave()

    def finish(self) -> None:
        self.release()
        with self._lock:
            if not self._running:
                return
            self._running = False
        self._admission._finish()

    def watch(self, future: Future) -> None:
        future.add_done_callback(self.release)   # cancelled or failed before starting: the place frees
