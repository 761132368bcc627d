"""The session journal: each session's committed token history on disk, so a restarted
server (``djinn serve --journal PATH``) continues every conversation where it was.

What it owns: one SQLite database (stdlib ``sqlite3``, WAL mode) with one row per session:
id, owner, model, the token ids (a blob of little-endian int32), the chat messages (JSON),
whether the last turn ended on an end-of-turn token, the turn count, how many tokens had KV,
and when it was written. KV is never journaled: a restored session starts *dropped* and its
first turn recomputes the KV from the tokens (engine ``_rebuild``), exactly as after a drop.

When rows are written (engine hooks, on the engine loop thread):
- ``commit(session)`` after every committed turn (``Engine.on_commit``) and after a
  truncation: the row is replaced in one transaction. A turn that failed or is paused at a
  breakpoint is not committed, so the journal holds the last *complete* turn.
- ``forget(session_id)`` when a session is closed (``Engine.on_close``): by its client, or by
  its lease ending. The server detaches this hook before its own shutdown closes every
  session, so a clean stop (SIGTERM) keeps the journal, like a crash does.

Durability (fsync policy): WAL with ``synchronous=NORMAL``. Each commit is in the WAL file
(the OS page cache) before the turn's reply is sent, so a crash of the *process* (SIGKILL,
OOM kill, segfault) loses nothing committed; a crash of the *machine* (power loss, kernel
panic) may lose the turns since the last WAL checkpoint's fsync. ``sync="full"``
(``--journal-sync full``) fsyncs the WAL at every commit and survives that too, at the cost
of one fsync per turn.

Which sessions: only those whose owner is a stable principal (``token:`` a server token,
``key:`` a client key; server/auth.py; ``http:`` the digest of an HTTP API key,
server/http/app.py), the only ones a client can name again after a restart. ``conn:``
principals (a connection without a key) die with their connection, so their sessions are not
journaled (a restart answers their ids with SessionNotFound, never with another's data).

HTTP conversations: the OpenAI-compatible front end keeps server-side sessions (matched by the
``X-Djinn-Session`` header, by the tool-call ids it issued, or by token prefix;
server/http/sessions.py). Their engine sessions are journaled like any other, and the front
end adds one ``conversations`` row per session (``note``: its namespace, issued tool-call
ids, last finish reason, turns; JSON) after each turn, so a restarted front end rebuilds its
index (``conversations()``) and every way of matching a conversation works again. The row
goes with the session (``forget``).

Stored Responses-API objects (server/http/responses.py): one ``responses`` row per stored
response (``note_response``: its id, owner, session, the conversation after it and the object
itself, JSON), written only while its session's row exists and removed by ``DELETE
/v1/responses/{id}`` (``forget_response``) or with its session (``forget``). A restarted front
end loads those whose session was restored (``responses()``), so ``GET`` and
``previous_response_id`` work again; ``store: false`` responses are never written.

A journal write that fails (disk full) is logged and counted, never raised into the turn:
the reply is still correct, only the restart guarantee is lost for that session.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from djinn.engine import Engine
    from djinn.engine.session import Session

log = logging.getLogger("djinn.server")

HTTP_OWNER = "http:"      # the HTTP front end's principals (server/http/app.py ``owner_of``)
STABLE_OWNERS = ("token:", "key:", HTTP_OWNER)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    tokens BLOB NOT NULL,
    messages TEXT NOT NULL,
    ended_with_eos INTEGER NOT NULL,
    turns INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    session_id TEXT NOT NULL,
    messages TEXT NOT NULL,
    obj TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_session ON responses (session_id)"""


def pack_tokens(tokens: list[int]) -> bytes:
    """Token ids as little-endian int32 (``array('i')`` is 4 bytes on every platform djinn runs on)."""
    a = array("i", tokens)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts only
        a.byteswap()
    return a.tobytes()


def unpack_tokens(blob: bytes) -> list[int]:
    a = array("i")
    a.frombytes(blob)
    if sys.byteorder != "little":  # pragma: no cover
        a.byteswap()
    return a.tolist()


def journaled(owner: str | None) -> bool:
    return owner is not None and owner.startswith(STABLE_OWNERS)


class Journal:
    def __init__(self, path: str | Path, sync: str = "normal"):
        if sync not in ("normal", "full"):
            raise ValueError("journal sync must be 'normal' or 'full'")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the engine loop writes, the main thread restores at start: one connection, one lock
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={sync.upper()}")
        self._db.executescript(_SCHEMA)
        self.counters = {"commits": 0, "forgets": 0, "errors": 0, "restored": 0, "restore_skipped": 0}

    # ---- engine hooks (engine loop thread) -------------------------------------------
    def commit(self, s: "Session") -> None:
        if not journaled(s.owner):
            return
        cached = min(max(s.num_cached, s.rebuild_to), len(s.tokens))
        row = (s.id, s.owner, s.model, pack_tokens(s.tokens), json.dumps(s.messages), int(s.ended_with_eos),
               s.turns, cached, time.time())
        try:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?,?,?,?)", row)
            self.counters["commits"] += 1
        except sqlite3.Error as exc:
            self.counters["errors"] += 1
            log.error("journal: could not record session %s: %s", s.id, exc)

    def forget(self, session_id: str) -> None:
        try:
            with self._lock:
                cur = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                self._db.execute("DELETE FROM conversations WHERE id = ?", (session_id,))
                self._db.execute("DELETE FROM responses WHERE session_id = ?", (session_id,))
            self.counters["forgets"] += cur.rowcount > 0
        except sqlite3.Error as exc:
            self.counters["errors"] += 1
            log.error("journal: could not forget session %s: %s", session_id, exc)

    # ---- the HTTP front end's conversations (its event loop's worker threads) ---------
    def note(self, session_id: str, meta: dict) -> None:
        """Record what the HTTP front end knows of a session beyond its tokens. Written only
        while the session's journal row exists (a note of a session closed meanwhile is dropped)."""
        try:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO conversations SELECT ?, ? WHERE EXISTS "
                                 "(SELECT 1 FROM sessions WHERE id = ?)", (session_id, json.dumps(meta), session_id))
        except sqlite3.Error as exc:
            self.counters["errors"] += 1
            log.error("journal: could not record conversation %s: %s", session_id, exc)

    def conversations(self) -> dict[str, dict]:
        """session id -> the front end's last note of it."""
        with self._lock:
            out = self._db.execute("SELECT id, meta FROM conversations").fetchall()
        return {sid: json.loads(meta) for sid, meta in out}

    def note_response(self, rid: str, owner: str, session_id: str, messages: list[dict], obj: dict) -> None:
        """Record a stored Responses-API object. Written only for a journaled owner and while
        its session's row exists (one closed meanwhile takes its responses with it)."""
        if not journaled(owner):
            return
        try:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO responses SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS "
                                 "(SELECT 1 FROM sessions WHERE id = ? AND owner = ?)",
                                 (rid, owner, session_id, json.dumps(messages), json.dumps(obj), time.time(),
                                  session_id, owner))
        except sqlite3.Error as exc:
            self.counters["errors"] += 1
            log.error("journal: could not record response %s: %s", rid, exc)

    def forget_response(self, rid: str) -> None:
        try:
            with self._lock:
                self._db.execute("DELETE FROM responses WHERE id = ?", (rid,))
        except sqlite3.Error as exc:
            self.counters["errors"] += 1
            log.error("journal: could not forget response %s: %s", rid, exc)

    def responses(self) -> list[dict]:
        """Every stored response, oldest first."""
        with self._lock:
            out = self._db.execute("SELECT id, owner, session_id, messages, obj FROM responses "
                                   "ORDER BY created").fetchall()
        return [{"id": r[0], "owner": r[1], "session_id": r[2], "messages": json.loads(r[3]), "obj": json.loads(r[4])}
                for r in out]

    # ---- start -----------------------------------------------------------------------
    def rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT id, owner, model, tokens, messages, ended_with_eos, turns, cached "
                                   "FROM sessions ORDER BY updated")
            out = cur.fetchall()
        return [{"session_id": r[0], "owner": r[1], "model": r[2], "tokens": unpack_tokens(r[3]),
                 "messages": json.loads(r[4]), "ended_with_eos": bool(r[5]), "turns": r[6], "cached": r[7]}
                for r in out]

    def restore(self, engine: "Engine") -> list[tuple[str, str]]:
        """Re-create every journaled session in ``engine`` (KV dropped, rebuilt on first use);
        returns ``(session_id, owner)`` of those restored. A row the engine refuses (its model
        is not loaded now, no room for more sessions) is skipped and logged, and kept on disk
        for a later start that loads that model."""
        restored = []
        for row in self.rows():
            try:
                engine.restore_session(**row)
            except Exception as exc:   # a typed DjinnError from the engine: skip this one
                self.counters["restore_skipped"] += 1
                log.warning("journal: session %s not restored: %s", row["session_id"], exc)
                continue
            restored.append((row["session_id"], row["owner"]))
        self.counters["restored"] = len(restored)
        return restored

    def attach(self, engine: "Engine") -> None:
        engine.on_commit = self.commit
        engine.on_close = self.forget

    def detach(self, engine: "Engine") -> None:
        """Shutdown: the engine closing every session must not empty the journal."""
        engine.on_commit = None
        engine.on_close = None

    def stats(self) -> dict:
        return {"path": str(self.path), **self.counters}

    def close(self) -> None:
        with self._lock:
            self._db.close()
