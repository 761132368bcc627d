"""``djinn bench whitebox --quick`` runs end to end and its resumed generations are exact."""

from __future__ import annotations

import json

from djinn.bench import whitebox


def test_quick_whitebox_bench_writes_its_record(tmp_path):
    assert whitebox.main(["--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("whitebox-cpu-*.json")
    rec = json.loads(path.read_text())
    assert rec["bench"] == "whitebox" and set(rec["results"]["layers"]) == {"0", "1", "2"}
    for row in rec["results"]["layers"].values():
        assert row["token_accuracy"] == {"prefill_resume": 1.0, "prefill_round_trip": 1.0, "decode_resume": 1.0}
        assert row["activation_shape"] == [64, 64] and row["plain_forward_ms"] > 0
