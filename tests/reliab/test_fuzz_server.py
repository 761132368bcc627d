"""Hypothesis against a real ``djinn serve`` subprocess (djinn.bench.fuzz): every request type
with random field values and payload tensors, and unreadable frames (random, truncated, wrong
version or magic, oversized, lying tensor descriptors). Each case ends in a valid reply or a
typed error; the server stays up; a well-formed client gets the same greedy output as before
the fuzzing and transformers' own generate; the server's holdings return to their baseline.
``DJINN_FUZZ=10`` runs ten times more cases."""

from __future__ import annotations

import torch

from djinn.bench.fuzz import fuzz_server
from tests.conftest import loaded
from tests.protocol.helpers import cases


def test_fuzzing_a_running_server_ends_every_case_typed_and_leaves_it_serving():
    res = fuzz_server(requests=cases(300), raw=cases(150), seed=11)
    print(f"\nend-to-end fuzz: {res['cases']} cases {res['cases_by_kind']}, replies {res['replies']}")
    assert res["cases"] == cases(300) + cases(150)
    assert res["failures"] == 0, res["failure_samples"]
    assert res["server_alive"] and res["good_client_same_output"]
    assert res["held_after"] == res["held_expected"]
    assert res["replies"].get("ok", 0) >= 20        # the fuzzer reached the engine, not only the validators
    assert res["replies"].get("protocol", 0) >= 20  # and the frame reader


def test_the_fuzz_oracle_prompt_matches_transformers():
    """The good client's reference output in fuzz_server is itself right (not just stable)."""
    from djinn.bench.fuzz import MODEL

    model = loaded(MODEL).model
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    from djinn.config import EngineConfig, MemoryConfig
    from djinn.engine import Engine
    from djinn.engine.requests import GenerateRequest
    from djinn.engine.sampling import SamplingParams

    engine = Engine({MODEL: loaded(MODEL)}, EngineConfig(memory=MemoryConfig(kv_blocks=8)))
    try:
        sid = engine.open_session(MODEL)
        out = engine.generate(sid, GenerateRequest(prompt=[3, 14, 15, 92, 65],
                                                   params=SamplingParams(max_new_tokens=8, ignore_eos=True)))
        assert out.token_ids == ref
    finally:
        engine.shutdown()
