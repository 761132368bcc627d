"""Regressions for bugs the fuzzers found (each was an internal error, HTTP 500)."""

from __future__ import annotations

import json

import torch

from djinn.engine.sampling import Sampler, SamplingParams


def test_a_top_p_below_float32s_smallest_value_keeps_the_most_likely_token():
    # schemathesis sent top_p=5e-324: in float32 it compares as 0, every token was dropped, NaN probs
    logits = torch.tensor([[0.1, 3.0, -1.0, 0.5]])
    s = Sampler(SamplingParams(temperature=1.0, top_p=5e-324, seed=1), torch.device("cpu"))
    assert s(logits).tolist() == [1]


def test_a_tiny_temperature_samples_the_argmax_instead_of_overflowing():
    logits = torch.tensor([[0.1, 3.0, -1.0, 0.5]])
    for t in (5e-324, 1e-30, 1e-6):
        s = Sampler(SamplingParams(temperature=t, seed=1), torch.device("cpu"))
        assert s(logits).tolist() == [1]


# ---- HTTP: inputs that got a 500 (tests/reliab/test_http_schema_fuzz.py's unusual values) ----

def _deep(n: int) -> str:
    return "[" * n + "]" * n


HTTP_FOUND = {
    # torch's generator takes 64 bits: manual_seed raised "Overflow when unpacking long long"
    # (and the session stayed busy: the engine had begun the turn)
    "seed 2^64": ("/v1/chat/completions", '{"seed": 18446744073709551616}', "seed"),
    "seed -2^64": ("/v1/chat/completions", '{"seed": -18446744073709551616}', "seed"),
    # json.loads recursed past Python's limit: RecursionError
    "nesting 100000 deep": ("/v1/chat/completions", '{"metadata": ' + _deep(100_000) + "}", None),
    "responses input 5000 deep": ("/v1/responses", '{"input": ' + _deep(5000) + "}", None),
    # an unpaired surrogate is valid JSON but not text: the tokenizer raised TypeError, the
    # error message for an unknown field UnicodeEncodeError
    "surrogate in content": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
                             "messages[0].content"),
    "surrogate in a field name": ("/v1/chat/completions", '{"\\udfff": 1}', None),
    "surrogate in a tool": ("/v1/chat/completions", '{"tools": [{"type": "function", "function": '
                            '{"name": "f", "description": "\\ud83d"}}]}', "tools[0].function.description"),
    "surrogate in input": ("/v1/responses", '{"input": "\\udc00"}', "input"),
}


def _with_base(path: str, extra: str) -> bytes:
    """A well-formed request to ``path`` with the fields of ``extra`` (raw JSON) added."""
    base = ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            if path == "/v1/chat/completions" else {"model": "tiny", "input": "hi", "max_output_tokens": 2})
    fields = extra[1:-1]
    return (json.dumps(base)[:-1] + (", " + fields if fields else "") + "}").encode()


def test_http_inputs_the_fuzzing_found_are_400s_and_leave_sessions_usable():
    from tests.conftest import HTTP_DEPS, loaded, require

    require(*HTTP_DEPS)
    from fastapi.testclient import TestClient

    from djinn.config import EngineConfig, MemoryConfig
    from djinn.engine import Engine
    from djinn.server.http import HttpConfig, create_app

    engine = Engine({"tiny": loaded("tiny-llama")}, EngineConfig(memory=MemoryConfig(kv_blocks=64)))
    headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    try:
        with TestClient(create_app(engine, HttpConfig()), raise_server_exceptions=False) as client:
            for name, (path, extra, param) in HTTP_FOUND.items():
                r = client.post(path, content=_with_base(path, extra), headers=headers)
                assert r.status_code == 400, f"{name}: {r.status_code} {r.text[:300]}"
                assert r.json()["error"]["param"] == param, name
            again = client.post("/v1/chat/completions", content=_with_base("/v1/chat/completions", "{}"),
                                headers=headers)
            assert again.status_code == 200, again.text    # no session was left busy
    finally:
        engine.shutdown()
