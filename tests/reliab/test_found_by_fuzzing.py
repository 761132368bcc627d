"""Regressions for bugs the fuzzers found (each was an internal error, HTTP 500)."""

from __future__ import annotations

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
