"""``djinn bench protocol --quick`` against the test server: runs end to end, echoes exactly."""

from __future__ import annotations

import json

from djinn.bench import protocol


def test_quick_protocol_bench_writes_its_record(djinn_server, tmp_path):
    argv = ["--quick", "--address", djinn_server.address, "--requests", "100", "--seconds", "0.05",
            "--out", str(tmp_path)]
    assert protocol.main(argv) == 0
    (path,) = tmp_path.glob("protocol-cpu-*.json")
    rec = json.loads(path.read_text())
    res = rec["results"]
    assert rec["bench"] == "protocol" and not res["server_started_here"]
    assert set(res["tensors"]) == {str(s) for s in protocol.QUICK_SIZES}
    for row in res["tensors"].values():
        for key in ("both", "up", "raw_socket_both", "raw_socket_up"):
            assert row[key]["median_ms"] > 0 and row[key]["reps"] >= 5
    assert 0 < res["empty_echo"]["p50_us"] <= res["empty_echo"]["p99_us"]
    assert set(res["targets"]) == {"empty_p50_under_1ms", "4MB_at_least_1GBps"}
