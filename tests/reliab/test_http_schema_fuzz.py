"""Schemathesis against the HTTP API (in-process app on a real engine, tiny-llama): requests
generated from its OpenAPI document (server/http/openapi.py), valid ones and ones that break
the schema, with and without a valid API key. No request may get a 5xx; the API keeps serving
a well-formed request afterwards and its memory returns to where it was once the sessions the
fuzzing opened are closed. ``DJINN_FUZZ=10`` runs ten times more cases."""

from __future__ import annotations

import pytest

from tests.conftest import HTTP_DEPS, require

require("schemathesis", *HTTP_DEPS)
import schemathesis  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from djinn.config import EngineConfig, MemoryConfig  # noqa: E402
from djinn.engine import Engine  # noqa: E402
from djinn.server.http import HttpConfig, create_app  # noqa: E402
from djinn.server.http.openapi import openapi_schema  # noqa: E402
from tests.conftest import loaded  # noqa: E402
from tests.protocol.helpers import cases  # noqa: E402

KEYS = ["fuzz-key-one", "fuzz-key-two"]
MAX_TOKENS = 4     # generated bodies may ask for the whole context; a few tokens test the same code on CPU


def _clamp(body):
    """Keep generation short (the value is still an integer >= 1 where it was one)."""
    if isinstance(body, dict):
        for k in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS:
                body[k] = MAX_TOKENS
    return body


@pytest.fixture(scope="module")
def api():
    engine = Engine({"tiny-llama": loaded("tiny-llama")}, EngineConfig(memory=MemoryConfig(kv_blocks=256)))
    try:
        with TestClient(create_app(engine, HttpConfig(api_keys=KEYS, default_max_tokens=MAX_TOKENS)), raise_server_exceptions=False) as client:
            yield client, engine
    finally:
        engine.shutdown()


def test_every_route_of_the_app_is_in_the_openapi_document(api):
    client, _ = api
    documented = {(p.replace("{name}", "{name:path}"), m.upper()) for p, ops in openapi_schema()["paths"].items()
                  for m in ops}
    routes = {(r.path, m) for r in client.app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    assert routes - documented == set()


def test_schema_fuzzing_gets_no_5xx_and_leaves_the_api_serving(api):
    client, engine = api
    schema = schemathesis.openapi.from_dict(openapi_schema(models=list(engine.runtimes)))
    ops = [r.ok() for r in schema.get_all_operations()]
    ops += [op for op in ops if op.method.upper() == "POST"] * 4     # the turns are where the work is
    modes = [schemathesis.GenerationMode.POSITIVE] * 2 + [schemathesis.GenerationMode.NEGATIVE]
    before = engine.stats()
    tally: dict[str, int] = {}
    bad: list[str] = []

    @seed(7)
    @settings(max_examples=cases(300), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(ops).flatmap(lambda op: st.sampled_from(modes).flatmap(op.as_strategy)),
           st.sampled_from(KEYS + ["wrong-key", None]))
    def one(case, key):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = _clamp(case.body) if isinstance(case.body, dict) else case.body
        path = case.formatted_path
        method = case.method.upper()
        if isinstance(body, (dict, list)):
            r = client.request(method, path, json=body, headers=headers, params=case.query or None)
        elif body is None or body.__class__.__name__ == "NotSet":
            r = client.request(method, path, headers=headers, params=case.query or None)
        else:
            r = client.request(method, path, content=body if isinstance(body, (bytes, str)) else repr(body),
                               headers={**headers, "Content-Type": "application/json"}, params=case.query or None)
        tally[f"{method} {case.path} {r.status_code}"] = tally.get(f"{method} {case.path} {r.status_code}", 0) + 1
        if r.status_code >= 500:
            bad.append(f"{method} {path} {body!r:.300} -> {r.status_code} {r.text[:300]}")

    one()
    n = sum(tally.values())
    print(f"\nschemathesis: {n} cases; " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())))
    assert not bad, "\n".join(bad[:10])
    turns = sum(v for k, v in tally.items() if k.startswith("POST") and k.endswith(" 200"))
    assert turns >= 10            # generation was reached, not only the validators

    # still serving, and the memory comes back once the fuzzing's sessions are closed
    ok = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS[0]}"},
                     json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    for key in KEYS:
        h = {"Authorization": f"Bearer {key}"}
        for s in client.get("/v1/sessions", headers=h).json()["data"]:
            assert client.delete(f"/v1/sessions/{s['id']}", headers=h).status_code == 200
    engine.residency.wait_idle()
    after = engine.stats()
    assert after["sessions"] == before["sessions"] == 0
    assert after["kv_blocks"]["tiny-llama"]["used"] == before["kv_blocks"]["tiny-llama"]["used"]
    assert after["memory"]["kv_parked"] == before["memory"]["kv_parked"]
