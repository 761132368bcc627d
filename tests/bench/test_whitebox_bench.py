"""``djinn bench whitebox --quick`` runs end to end and its resumed generations are exact; its
judge of a divergence (``verdict``) on hand-made logits."""

from __future__ import annotations

import json

import pytest
import torch

from djinn.bench import whitebox


def test_quick_whitebox_bench_writes_its_record(tmp_path):
    assert whitebox.main(["--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("whitebox-cpu-*.json")
    rec = json.loads(path.read_text())
    res = rec["results"]
    assert rec["bench"] == "whitebox" and set(res["layers"]) == {"0", "1", "2"}
    assert 0 <= res["logits_rounding_measured"] < 1e-5 and res["tie_tolerance"] >= 1e-5
    for row in res["layers"].values():
        runs = {"prefill_resume", "prefill_round_trip", "decode_resume"}
        assert row["token_accuracy"] == row["token_accuracy_tie_adjusted"] == dict.fromkeys(runs, 1.0)
        assert row["verdicts"] == dict.fromkeys(runs, "equal")
        assert row["activation_shape"] == [64, 64]
        assert row["plain_generate_ms"] > 0 and row["plain_forward_ms"] > 0
    assert res["summary"]["runs_wrong"] == 0


def _logits(rows: list[dict[int, float]], vocab: int = 6) -> torch.Tensor:
    out = torch.zeros(len(rows), vocab)
    for i, row in enumerate(rows):
        for tok, value in row.items():
            out[i, tok] = value
    return out


def test_a_divergence_at_a_near_tie_is_a_tie_and_one_past_rounding_is_wrong():
    reference = [1, 2, 3]
    assert whitebox.verdict([1, 2, 3], reference, None, 1e-5) == {
        "exact": 1.0, "tie_adjusted": 1.0, "verdict": "equal", "diverges_at": None}
    # step 1: the reference's best two (2 and 4) are 3e-6 apart and the run took 4; it then
    # continued greedily on its own history
    tie = _logits([{1: 1.0}, {2: 0.5, 4: 0.5 - 3e-6}, {5: 0.7}])
    v = whitebox.verdict([1, 4, 5], reference, tie, 1e-5)
    assert v["verdict"] == "near_tie" and v["diverges_at"] == 1 and v["tie_adjusted"] == 1.0
    assert v["exact"] == pytest.approx(1 / 3) and v["top2_gap_at_divergence"] == pytest.approx(3e-6, abs=1e-7)
    # the same divergence with a gap of 0.1: wrong, and so is the token after it only if it is not greedy
    wrong = _logits([{1: 1.0}, {2: 0.5, 4: 0.4}, {5: 0.7}])
    v = whitebox.verdict([1, 4, 5], reference, wrong, 1e-5)
    assert v["verdict"] == "wrong" and v["tie_adjusted"] == pytest.approx(2 / 3)
    assert v["reference_minus_got_at_divergence"] == pytest.approx(0.1)
