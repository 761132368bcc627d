"""Which server-resident session an HTTP request continues: the HTTP layer's view of sessions.

Owns ``Conversation`` (one engine session as the HTTP API sees it: owner, token history mirror,
tool-call ids it issued) and the matching order, strongest key first:

1. the ``X-Djinn-Session`` header (or ``djinn_session`` body field);
2. ``previous_response_id`` (resolved by the Responses endpoint, passed in as a session);
3. the ids of tool calls Djinn issued that the request's tool messages answer;
4. the longest common token prefix with a session of the same key, model and namespace whose
   whole history the new prompt continues and which reaches past the shared system+tools
   prefix; the most recently used wins.

Invariants: sessions of different API keys never match (every lookup is scoped by owner); a
session is never matched by prefix while another request holds it; ``tokens`` equals the
engine session's token history whenever no request holds the session.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from djinn.server.http.errors import bad_request, not_found


@dataclass
class Conversation:
    id: str                                   # the engine session id
    owner: str
    model: str
    namespace: str | None
    tokens: list[int] = field(default_factory=list)
    issued_calls: list[str] = field(default_factory=list)
    pending_calls: set[str] = field(default_factory=set)   # ids of the last reply's tool calls
    finish_reason: str | None = None
    turns: int = 0
    responses: set[str] = field(default_factory=set)      # stored Responses API ids on this session
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SessionIndex:
    """All conversations of this front end, by id, by issued tool-call id, by owner."""

    def __init__(self, idempotency_entries: int = 256):
        self.by_id: dict[str, Conversation] = {}
        self.by_call: dict[tuple[str, str], str] = {}        # (owner, tool-call id) -> session id
        self.done: OrderedDict[tuple[str, str], object] = OrderedDict()   # finished requests, for retries
        self.inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._idem_entries = idempotency_entries

    # ---- lookups -----------------------------------------------------------------------
    def get(self, owner: str, session_id: str) -> Conversation:
        c = self.by_id.get(session_id)
        if c is None or c.owner != owner:
            raise not_found(f"no session {session_id!r}: it never existed, was closed, or belongs to another key",
                            param="X-Djinn-Session", code="session_not_found")
        return c

    def owned(self, owner: str) -> list[Conversation]:
        return [c for c in self.by_id.values() if c.owner == owner]

    def by_tool_results(self, owner: str, messages: list[dict]) -> Conversation | None:
        """The session whose issued tool calls the request's trailing tool messages answer."""
        for m in reversed(messages):
            if m["role"] != "tool":
                break
            sid = self.by_call.get((owner, m["tool_call_id"]))
            if sid is not None and sid in self.by_id:
                return self.by_id[sid]
        return None

    def by_prefix(self, owner: str, model: str, namespace: str | None, prompt: list[int],
                  system_prefix: int) -> tuple[Conversation | None, int, Conversation | None]:
        """(most recent session the prompt continues, the longest partial overlap with any other
        past the system prompt, and that other session: the one a diverging request forks)."""
        best, overlap, parent = None, 0, None
        for c in self.by_id.values():
            if c.owner != owner or c.model != model or c.namespace != namespace or c.lock.locked() or not c.tokens:
                continue
            n = common_prefix(c.tokens, prompt)
            if n == len(c.tokens) and n > system_prefix:
                if best is None or c.last_used > best.last_used:
                    best = c
            elif n > system_prefix and n > overlap:
                overlap, parent = n, c
        return best, overlap, parent

    def check_model(self, c: Conversation, model: str) -> None:
        if c.model != model:
            raise bad_request(f"session {c.id} runs model {c.model!r}, not {model!r}", param="model")

    # ---- changes -----------------------------------------------------------------------
    def add(self, c: Conversation) -> None:
        self.by_id[c.id] = c

    def remove(self, session_id: str) -> Conversation | None:
        c = self.by_id.pop(session_id, None)
        if c is not None:
            for call in c.issued_calls:
                self.by_call.pop((c.owner, call), None)
        return c

    def issue_calls(self, c: Conversation, ids: list[str]) -> None:
        for i in ids:
            self.by_call[(c.owner, i)] = c.id
        c.issued_calls.extend(ids)
        c.pending_calls = set(ids)

    # ---- retries -----------------------------------------------------------------------
    def remember(self, key: tuple[str, str], outcome: object) -> None:
        self.done[key] = outcome
        self.done.move_to_end(key)
        while len(self.done) > self._idem_entries:
            self.done.popitem(last=False)
