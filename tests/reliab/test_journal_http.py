"""Restart without loss, HTTP front end: a conversation of the OpenAI-compatible API on a
``djinn serve --journal`` killed with SIGKILL continues after a restart, found by its session id
(``X-Djinn-Session``) and by its token prefix, with the answer an uninterrupted server gives the
same messages (a fresh conversation in another namespace: no shared state with the first).
"""

from __future__ import annotations

import signal
import socket
import time

import httpx

from djinn.server.journal import Journal
from djinn.server.launch import ServerProcess
from tests.conftest import TEST_CHILD_ENV

MODEL = "tiny-llama"
TOKEN = "journal-http-token-" + "h" * 24


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server(journal: str, port: int, token: str | None = TOKEN) -> ServerProcess:
    """``token=None``: no server token, so every HTTP API key is accepted (each its own owner)."""
    return ServerProcess("--kv-blocks", "128", "--lease", "1", "--journal", journal, "--http-port", str(port),
                         token=token, env=TEST_CHILD_ENV).start()


def _http(port: int, key: str = TOKEN) -> httpx.Client:
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/health", timeout=5)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    return httpx.Client(base_url=url + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _chat(http: httpx.Client, msgs: list[dict], headers: dict | None = None, **extra) -> tuple[str, str, dict]:
    r = http.post("/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 0,
                                             **extra}, headers=headers or {})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], r.headers["x-djinn-session-id"], body["djinn"]


def test_an_http_conversation_survives_sigkill_and_restart(tmp_path):
    journal = str(tmp_path / "journal.sqlite")
    port = _port()
    srv = _server(journal, port)
    try:
        with _http(port) as http:
            msgs = [{"role": "user", "content": "tea sky red"}]
            a1, sid, _ = _chat(http, msgs)
            msgs += [{"role": "assistant", "content": a1}, {"role": "user", "content": "go one"}]
            a2, sid2, info = _chat(http, msgs)
            assert sid2 == sid and info["matched_by"] == "prefix"
            msgs += [{"role": "assistant", "content": a2}]
    finally:
        srv.stop(signal.SIGKILL)                     # a crash: no shutdown code runs
    assert srv.proc.returncode == -signal.SIGKILL
    rows = Journal(journal)
    assert [r["session_id"] for r in rows.rows()] == [sid] and rows.conversations()[sid]["turns"] == 2
    rows.close()

    port = _port()
    srv = _server(journal, port)
    try:
        assert "1 session(s) restored" in srv.output
        time.sleep(2.5)                              # past the native lease: an HTTP conversation has none
        with _http(port) as http:
            assert http.get(f"/sessions/{sid}").status_code == 200
            nxt = msgs + [{"role": "user", "content": "red red"}]
            a3, sid3, info = _chat(http, nxt, headers={"X-Djinn-Session": sid})
            assert sid3 == sid and info["matched_by"] == "header"
            # the uninterrupted answer: the same messages as a fresh conversation (another namespace)
            fresh, fresh_sid, finfo = _chat(http, nxt, prompt_cache_key="elsewhere")
            assert fresh_sid != sid and finfo["matched_by"] == "new"
            assert a3 == fresh
            # and without the header, by its token prefix
            nxt += [{"role": "assistant", "content": a3}, {"role": "user", "content": "one"}]
            _, sid4, info = _chat(http, nxt)
            assert sid4 == sid and info["matched_by"] == "prefix"
            assert http.delete(f"/sessions/{sid}").status_code == 200
    finally:
        srv.stop(signal.SIGKILL)
    rows = Journal(journal)
    assert sid not in {r["session_id"] for r in rows.rows()} and sid not in rows.conversations()
    rows.close()
