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


# ---- unusual values in every field: unicode, integer ranges, nesting depth -------------------
# schemathesis draws values its schema allows or breaks it in ways of its own; these are the
# classes it rarely reaches and that found 500s: integers past 64 bits, unpaired surrogates and
# other odd text, NaN and infinities (Python's json reads them), and nesting past any limit.

ODD_TEXT = ["\ud800", "\udfff", "a\udc00b", "\ud83d\ude00", "\x00", "\ufeff", "\u202e", "e\u0301", "\U0010ffff",
            "\uffff", "<|im_end|>", "<tool_call>", "</tool_call>", "", " ", "\n\n\n", "x" * 5000, "٣", "𝟘"]
ODD_INTS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, -2**64,
            10**400, -10**400]
DEEP = "__deep__"        # replaced by that many nested arrays in the encoded body
TEXT = st.one_of(st.text(st.characters(exclude_categories=()), max_size=12), st.sampled_from(ODD_TEXT))
LEAF = st.one_of(st.integers(), st.sampled_from(ODD_INTS), st.floats(), TEXT, st.booleans(), st.none())
VALUE = st.one_of(
    LEAF,
    st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                 max_leaves=8),
    st.sampled_from([32, 63, 64, 65, 1000, 100_000]).map(lambda n: f"{DEEP}{n}"))

CHAT_BASE = {"model": "tiny-llama", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "hi"}], "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
RESPONSES_BASE = {"model": "tiny-llama", "input": "hi", "max_output_tokens": 2}
PLACES = {   # where a value goes: a path of keys and list indexes into the base body
    "/v1/chat/completions": [(k,) for k in ("model", "messages", "tools", "tool_choice", "parallel_tool_calls",
                                            "stream", "stop", "max_tokens", "max_completion_tokens", "temperature",
                                            "top_p", "seed", "user", "prompt_cache_key", "djinn_session", "n",
                                            "logit_bias", "metadata", "response_format", "unknown_field")]
    + [("messages", 1, "content"), ("messages", 1, "role"), ("messages", 1, "name"), ("messages", 0, "content"),
       ("messages", 1, "content", 0), ("messages", 1, "content", 0, "text"), ("messages", 2),
       ("tools", 0, "function", "name"), ("tools", 0, "function", "parameters"),
       ("tools", 0, "function", "parameters", "properties", "city"), ("tools", 0, "function", "description"),
       ("tool_choice", "function", "name"), ("stop", 0), ("stream_options", "include_usage")],
    "/v1/responses": [(k,) for k in ("model", "input", "instructions", "tools", "tool_choice", "max_output_tokens",
                                     "temperature", "top_p", "previous_response_id", "store", "stream", "text",
                                     "reasoning", "metadata", "unknown_field")]
    + [("input", 0), ("input", 0, "content"), ("input", 0, "role"), ("tools", 0, "name"), ("tools", 0, "parameters")],
}


def _put(body, path, value):
    """``body`` with ``value`` at ``path``, creating what is missing on the way."""
    node = body
    for key, nxt in zip(path, path[1:]):
        if isinstance(node, list):
            while len(node) <= key:
                node.append({} if isinstance(nxt, str) else [])
            if not isinstance(node[key], (dict, list)):
                node[key] = {} if isinstance(nxt, str) else []
            node = node[key]
        else:
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {} if isinstance(nxt, str) else []
            node = node[key]
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value
    return body


def _encode(body, ascii_only: bool) -> bytes:
    import json
    import re

    text = json.dumps(body, ensure_ascii=ascii_only)      # NaN and Infinity stay: Python's json reads them
    text = re.sub(f'"{DEEP}(\\d+)"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)
    return text.encode("utf-8", "surrogatepass")         # not ascii_only: a surrogate is invalid UTF-8


def test_unusual_values_in_every_field_get_no_5xx(api):
    import copy
    from urllib.parse import quote

    client, engine = api
    headers = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    tally: dict[int, int] = {}
    bad: list[str] = []

    def check(r, what: str) -> None:
        tally[r.status_code] = tally.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            bad.append(f"{what} -> {r.status_code} {r.text[:200]}")

    @seed(11)
    @settings(max_examples=cases(200), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(PLACES)).flatmap(lambda path: st.tuples(st.just(path), st.sampled_from(PLACES[path]))),
           VALUE, st.booleans(), st.booleans(), TEXT)
    def one(where, value, with_tools, ascii_only, odd_id):
        route, place = where
        base = copy.deepcopy(CHAT_BASE if route == "/v1/chat/completions" else RESPONSES_BASE)
        if with_tools:
            base["tools"] = [copy.deepcopy(TOOL) if route == "/v1/chat/completions"
                             else {"type": "function", **TOOL["function"]}]
        body = _clamp(_put(base, place, value))
        raw = _encode(body, ascii_only)
        check(client.post(route, content=raw, headers=headers), f"POST {route} {raw[:300]!r}")
        # the ids in paths, as odd as the values
        ident = quote(odd_id.encode("utf-8", "surrogatepass"), safe="")
        for method, path in (("GET", f"/v1/sessions/{ident}"), ("DELETE", f"/v1/sessions/{ident}"),
                             ("GET", f"/v1/models/{ident}"), ("GET", f"/v1/responses/{ident}")):
            check(client.request(method, path, headers=headers), f"{method} {path[:200]}")

    one()
    print(f"\nunusual values: {sum(tally.values())} requests; statuses {dict(sorted(tally.items()))}")
    assert not bad, "\n".join(bad[:10])
    assert tally.get(200, 0) >= 20          # valid values got through to generation too
    ok = client.post("/v1/chat/completions", headers=headers, content=_encode(CHAT_BASE, True))
    assert ok.status_code == 200, ok.text   # still serving, no session left busy
    for key in KEYS:                        # leave no sessions for the other tests of this module
        h = {"Authorization": f"Bearer {key}"}
        for s in client.get("/v1/sessions", headers=h).json()["data"]:
            assert client.delete(f"/v1/sessions/{s['id']}", headers=h).status_code == 200


ODD_FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1e308, 2.0000000000000004, 0.1]
GRID = {"integers": ODD_INTS, "text": ODD_TEXT, "floats": ODD_FLOATS,
        "nesting": [f"{DEEP}{n}" for n in (63, 64, 65, 1000, 100_000)] + [[{"a": [{}]}], {"": {"": []}}]}


@pytest.mark.parametrize("kind", sorted(GRID))
def test_every_unusual_value_in_every_field_gets_no_5xx(api, kind):
    """The sweep behind the random test above: each value of a class in each place of each
    route (with and without tools), so a class that breaks one field is found every run."""
    import copy

    client, _ = api
    headers = {"Authorization": f"Bearer {KEYS[1]}", "Content-Type": "application/json"}
    tally: dict[int, int] = {}
    bad: list[str] = []
    for route, places in sorted(PLACES.items()):
        for place in places:
            for value in GRID[kind]:
                base = copy.deepcopy(CHAT_BASE if route == "/v1/chat/completions" else RESPONSES_BASE)
                if place[0] == "tools" or place[:1] == ("tool_choice",):
                    base["tools"] = [copy.deepcopy(TOOL) if route == "/v1/chat/completions"
                                     else {"type": "function", **TOOL["function"]}]
                raw = _encode(_clamp(_put(base, place, copy.deepcopy(value))), True)
                r = client.post(route, content=raw, headers=headers)
                tally[r.status_code] = tally.get(r.status_code, 0) + 1
                if r.status_code >= 500:
                    bad.append(f"{route} {'.'.join(map(str, place))} = {value!r:.60} -> {r.status_code}")
    print(f"\n{kind}: {sum(tally.values())} requests; statuses {dict(sorted(tally.items()))}")
    assert not bad, "\n".join(bad[:20])
    h = {"Authorization": f"Bearer {KEYS[1]}"}
    for s in client.get("/v1/sessions", headers=h).json()["data"]:
        assert client.delete(f"/v1/sessions/{s['id']}", headers=h).status_code == 200
