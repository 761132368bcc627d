"""Isolation between principals beyond what tests/server/test_ownership.py covers: expressions
(fetch and resume) that name another principal's server-side tensor, a journaled session
restored for its owner only (test_journal.py), and the HTTP API's sessions per API key
(tiny-llama in-process, so it runs without the smollm2 cache)."""

from __future__ import annotations

import pytest
import torch

import djinn
from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine
from djinn.protocol import Expr
from tests.conftest import loaded

MODEL = "tiny-llama"
A, B = "key:alice", "key:bob"


@pytest.fixture(scope="module")
def engine():
    e = Engine({MODEL: loaded(MODEL)}, EngineConfig(memory=MemoryConfig(kv_blocks=64)))
    yield e
    e.shutdown()


def test_expressions_cannot_reach_another_principals_tensors(engine):
    sa = engine.open_session(MODEL, owner=A)
    secret = engine.forward(sa, [5, 6, 7], owner=A)["logits"]
    sb = engine.open_session(MODEL, owner=B)
    mine = engine.forward(sb, [1, 2], owner=B)["logits"]
    paused = engine.forward(sb, [3], breakpoint=0, owner=B)["paused"]
    before = engine.stats()
    tensors: list = []
    steal = Expr.ref(secret["id"]).encode(tensors)
    with pytest.raises(djinn.InvalidRequest, match="another session"):
        engine.fetch(mine["id"], steal, tensors, owner=B)        # B's own tensor, an expression over A's
    with pytest.raises(djinn.InvalidRequest, match="another session"):
        engine.resume(paused["paused_id"], Expr.ref(secret["id"]).encode([]), [], owner=B)
    with pytest.raises(djinn.SessionNotFound):
        engine.fetch(secret["id"], owner=B)
    with pytest.raises(djinn.SessionNotFound):
        engine.resume(paused["paused_id"], owner=A)               # A cannot resume B's breakpoint
    after = engine.stats()
    assert after["memory"]["tensors"] == before["memory"]["tensors"] and after["sessions"] == before["sessions"]
    # A's tensor is intact and still A's
    assert engine.fetch(secret["id"], owner=A).shape[0] == 3
    engine.close_session(sa, owner=A)
    engine.close_session(sb, owner=B)


def test_http_sessions_of_one_api_key_are_invisible_to_another():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from djinn.server.http import HttpConfig, create_app

    e = Engine({MODEL: loaded(MODEL)}, EngineConfig(memory=MemoryConfig(kv_blocks=64)))
    try:
        with TestClient(create_app(e, HttpConfig(api_keys=["key-a", "key-b"]))) as c:
            ha, hb = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
            body = {"model": MODEL, "messages": [{"role": "user", "content": "a secret"}], "max_tokens": 3,
                    "temperature": 0}
            r = c.post("/v1/chat/completions", headers=ha, json=body)
            assert r.status_code == 200, r.text
            sid = r.headers["x-djinn-session-id"]
            tokens = len(e.sessions[sid].tokens)
            assert c.get(f"/v1/sessions/{sid}", headers=hb).status_code == 404
            assert sid not in {s["id"] for s in c.get("/v1/sessions", headers=hb).json()["data"]}
            assert c.delete(f"/v1/sessions/{sid}", headers=hb).status_code == 404
            r = c.post("/v1/chat/completions", headers={**hb, "X-Djinn-Session": sid},
                       json={**body, "messages": [{"role": "user", "content": "continue"}]})
            assert r.status_code == 404 or r.headers.get("x-djinn-session-id") != sid
            assert len(e.sessions[sid].tokens) == tokens   # untouched
            assert c.get(f"/v1/sessions/{sid}", headers=ha).status_code == 200
    finally:
        e.shutdown()
