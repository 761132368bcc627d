"""``djinn bench swap --quick``: the CI smoke run of the swap benchmark (tiny-llama, CPU)."""

from __future__ import annotations

import json

from djinn.bench import swap


def test_swap_bench_quick_writes_its_record(tmp_path):
    assert swap.main(["--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("swap-cpu-*.json")
    rec = json.loads(path.read_text())
    res = rec["results"]
    assert [r["tokens"] for r in res["sizes"]] == [64, 256, 480]
    for row in res["sizes"]:
        assert row["bytes"] == row["blocks"] * rec["params"]["block_bytes"] and row["restore_gbps"] > 0
    assert res["signal_idle"]["park"]["n"] == 30 and res["signal_idle"]["park"]["p50"] >= 0
    assert res["decode"]["copies"] > 0 and res["engine_stats"]["swaps"]["out"] > 0


def test_swap_bench_quick_oversubscription_completes_every_turn(tmp_path):
    assert swap.main(["--quick", "--oversub", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("swap-oversub-cpu-*.json")
    r = json.loads(path.read_text())["results"]["oversub"]
    assert r["turns_completed"] == r["turns_expected"] and r["oversubscription"] > 3
