"""Errors, retries, disconnects, models, health and metrics of the HTTP API (real server process)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import HTTP_DEPS, require

require(*HTTP_DEPS, "openai")

import openai  # noqa: E402

from tests.server.http_helpers import KEY, SYSTEM, WEATHER  # noqa: E402

MODEL = "smollm2-135m"


def post(server, path, body, key=KEY, **headers):
    return httpx.post(server.root + path, json=body, timeout=300,
                      headers={"Authorization": f"Bearer {key}", **headers})


def test_errors_are_openai_shaped_with_the_right_status(server):
    c = server.client()
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"},
                                                         {"role": "tool", "tool_call_id": "call_nope", "content": "1"}])
    assert e.value.body["code"] == "unknown_tool_call_id"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 9000}], max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert "n=2" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                  extra_body={"frobnicate": True})
    assert "frobnicate" in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                  tool_choice={"type": "function", "function": {"name": "not_a_tool"}})
    big = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    bad = httpx.post(server.root + "/v1/chat/completions", content=b"{not json", timeout=60,
                     headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    assert server.get("/v1/nowhere").status_code == 404
    # after all that, the server still serves
    ok = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_a_retried_request_never_appends_a_turn_twice(server):
    body = {"model": MODEL, "messages": [SYSTEM, {"role": "user", "content": "Pick a fruit."}], "temperature": 0,
            "max_tokens": 4}
    first = post(server, "/v1/chat/completions", body, **{"x-stainless-retry-count": "0"})
    sid = first.headers["x-djinn-session-id"]
    before = server.session(sid)
    again = post(server, "/v1/chat/completions", body, **{"x-stainless-retry-count": "1"})
    assert again.json()["id"] == first.json()["id"]
    after = server.session(sid)
    assert (after["turns"], after["tokens"]) == (before["turns"], before["tokens"])
    # an explicit idempotency key replays too, streamed as well
    body2 = dict(body, messages=[{"role": "user", "content": "Pick a colour."}])
    k1 = post(server, "/v1/chat/completions", body2, **{"idempotency-key": "abc-123"}).json()
    k2 = post(server, "/v1/chat/completions", body2, **{"idempotency-key": "abc-123"}).json()
    assert k1["id"] == k2["id"] and k1["djinn"]["session_id"] == k2["djinn"]["session_id"]


def test_a_client_leaving_mid_stream_leaves_the_last_complete_turn(server):
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                                  temperature=0, max_tokens=3)
    sid = r.model_extra["djinn"]["session_id"]
    before = server.wait_idle(sid)
    body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": 200,
            "messages": [{"role": "user", "content": "Count to five."},
                         {"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "Now write a long story about a cat."}]}
    with httpx.stream("POST", server.root + "/v1/chat/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.headers["x-djinn-session-id"] == sid
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen >= 3:
                    break
    after = server.wait_idle(sid)
    assert after["turns"] == before["turns"] and after["tokens"] == before["tokens"]
    assert after["kv_tokens"] <= after["tokens"]
    # and the conversation goes on from there
    body["stream"], body["max_tokens"] = False, 2
    r2 = post(server, "/v1/chat/completions", body).json()
    assert r2["djinn"]["session_id"] == sid
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= before["kv_tokens"]


def test_models_health_metrics_and_sessions(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(server.root + "/health").json()["status"] == "ok"
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    sid = r.model_extra["djinn"]["session_id"]
    text = httpx.get(server.root + "/metrics").text
    for name in ("djinn_sessions{", 'djinn_kv_bytes{tier="device"}', 'djinn_kv_bytes{tier="host"}',
                 "djinn_swaps_total", "djinn_bytes_moved_total", "djinn_queue_seconds_bucket",
                 "djinn_turn_seconds_bucket", "djinn_kv_shared_bytes", "djinn_kv_sharing_ratio"):
        assert name in text, name
    active = [l for l in text.splitlines() if l.startswith('djinn_sessions{phase="ACTIVE"}')]
    assert active and float(active[0].split()[-1]) >= 1
    listed = {s["id"]: s for s in server.get("/v1/sessions").json()["data"]}
    assert listed[sid]["phase"] == "ACTIVE" and listed[sid]["kv_location"] in ("device", "host")
    gone = httpx.delete(server.root + f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert gone.json()["deleted"] is True
    assert server.get(f"/v1/sessions/{sid}").status_code == 404
