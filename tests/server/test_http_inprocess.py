"""The app in-process on a tiny random model: running out of KV evicts idle sessions, best victim
first, instead of failing the request: the engine parks them to host memory, and where the engine
refuses (the ``resident`` policy never moves KV) the front end closes one."""

from __future__ import annotations

import pytest

from tests.conftest import HTTP_DEPS, require

require(*HTTP_DEPS)

from fastapi.testclient import TestClient  # noqa: E402

from djinn.config import EngineConfig, MemoryConfig  # noqa: E402
from djinn.engine import Engine  # noqa: E402
from djinn.server.http import HttpConfig, create_app  # noqa: E402
from tests.conftest import loaded  # noqa: E402


@pytest.fixture(params=["resident"])
def app_client(request):
    engine = Engine({"tiny": loaded("tiny-llama")},
                    EngineConfig(memory=MemoryConfig(kv_blocks=14, policy=request.param)))
    try:
        with TestClient(create_app(engine, HttpConfig())) as client:
            yield client, engine
    finally:
        engine.shutdown()


def chat(client, text, key="k", **kw):
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 3,
                             "temperature": 0, **kw})


def test_a_full_kv_pool_closes_the_least_recently_used_idle_session(app_client):
    client, engine = app_client
    ids = []
    for i in range(5):                       # ~60 tokens each on a byte tokenizer: 4 blocks; the pool has 13
        r = chat(client, f"conversation number {i}: " + "abcdefghij" * 4)
        assert r.status_code == 200, r.text
        ids.append(r.json()["djinn"]["session_id"])
    live = {s["id"] for s in client.get("/v1/sessions", headers={"Authorization": "Bearer k"}).json()["data"]}
    assert ids[-1] in live and ids[0] not in live          # the oldest went first
    assert engine.stats()["kv_blocks"]["tiny"]["used"] <= 13


@pytest.mark.parametrize("app_client", ["semantic"], indirect=True)
def test_a_full_kv_pool_parks_the_least_recently_used_idle_session(app_client):
    client, engine = app_client
    ids = []
    for i in range(5):
        r = chat(client, f"conversation number {i}: " + "abcdefghij" * 4)
        assert r.status_code == 200, r.text
        ids.append(r.json()["djinn"]["session_id"])
    engine.residency.wait_idle()
    live = {s["id"]: s for s in client.get("/v1/sessions", headers={"Authorization": "Bearer k"}).json()["data"]}
    assert set(ids) <= set(live)                            # nothing was closed
    assert live[ids[0]]["kv_location"] == "host"           # the oldest was parked
    assert engine.stats()["kv_blocks"]["tiny"]["used"] <= 13 and engine.stats()["swaps"]["out"] >= 1


def test_without_configured_keys_each_key_is_its_own_namespace(app_client):
    client, _ = app_client
    a = chat(client, "same words", key="alice").json()["djinn"]["session_id"]
    assert client.get(f"/v1/sessions/{a}", headers={"Authorization": "Bearer bob"}).status_code == 404
    assert client.get(f"/v1/sessions/{a}", headers={"Authorization": "Bearer alice"}).status_code == 200


def _streamed(client, body: dict) -> tuple[str, str | None]:
    import json

    text, finish = "", None
    with client.stream("POST", "/v1/chat/completions", headers={"Authorization": "Bearer k"},
                       json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
                    finish = choice["finish_reason"] or finish
    return text, finish


def test_streamed_and_whole_replies_with_a_stop_string_are_equal(app_client):
    """Regression: the stream sent the first characters of the stop string before stopping."""
    client, _ = app_client
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 24,
            "temperature": 0}
    full = chat(client, "tell me a story", max_tokens=24).json()["choices"][0]["message"]["content"]
    # a stop string late in the reply, of characters that decode cleanly
    at = max(i for i in range(1, len(full) - 2) if "\ufffd" not in full[i:i + 3])
    stop = [full[at:at + 3]]
    whole = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k"},
                        json={**body, "stop": stop}).json()["choices"][0]
    assert whole["finish_reason"] == "stop" and len(whole["message"]["content"]) < len(full)
    assert _streamed(client, {**body, "stop": stop}) == (whole["message"]["content"], "stop")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 3}}, "required": ["city"]}}}


def test_a_tool_call_cut_by_max_tokens_ends_with_length_and_no_markup(app_client, monkeypatch):
    """Regression: a forced call cut by max_tokens came back as content "<tool_call>\\n{\"name\"..."."""
    pytest.importorskip("xgrammar")
    from djinn.server.http.render import Renderer

    # the tools described in the prompt fill more than tiny-llama's 512-token context: a short prompt
    monkeypatch.setattr(Renderer, "prompt", lambda self, req: self.encode("<|im_start|>user\nweather<|im_end|>\n"
                                                                          "<|im_start|>assistant\n"))
    client, _ = app_client
    body = {"model": "tiny", "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 30,
            "temperature": 0, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": True}
    r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k"}, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 30
    assert choice["message"]["content"] is None and "tool_calls" not in choice["message"]
    assert _streamed(client, {**body, "messages": [{"role": "user", "content": "weather again?"}]}) == ("", "length")
