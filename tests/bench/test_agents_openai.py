"""``djinn bench agents --api openai``: the agent workload through a real HTTP server process and
``openai.AsyncOpenAI``, leaving the native run's JSON keys. Timing values are never checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from djinn.bench import agent_api, agents, plot
from djinn.bench.metrics import moved_bytes, stat

from tests.bench.test_bench_smoke import DIST_KEYS, RUN_KEYS
from tests.conftest import TEST_CHILD_ENV, requires_smollm2


class _Engine:
    def __init__(self, stats: dict):
        self._stats = stats

    def stats(self) -> dict:
        return self._stats


def test_metrics_text_reads_back_as_the_stats_the_bench_uses():
    """The server's own Prometheus rendering of known engine stats parses back to those numbers."""
    from djinn.server.http.metrics import Metrics

    engine_stats = {"sessions_by_phase": {"ACTIVE": 2, "IO_WAIT": 3, "PAUSED": 0},
                    "memory": {"kv_device": 4096, "kv_host": 8192, "kv_device_capacity": 65536,
                               "kv_host_capacity": 131072, "weights": 1000},
                    "swaps": {"out": 4, "in": 3, "dropped": 1}, "bytes_moved": {"out": 700, "in": 500},
                    "turns": 9, "tokens_generated": 90, "tokens_computed": 300}
    got = agent_api.parse_metrics(Metrics(_Engine(engine_stats)).render().decode())
    for key, want in (("kv_device", 4096), ("kv_host", 8192), ("kv_device_capacity", 65536),
                      ("kv_host_capacity", 131072), ("weights", 1000), ("sessions", 5)):
        assert stat(got, key) == want, key
    assert moved_bytes(got) == 1200
    assert got["swaps"] == {"out": 4, "in": 3, "dropped": 1}
    assert (got["turns"], got["tokens_generated"], got["tokens_computed"]) == (9, 90, 300)


def test_openai_api_refuses_an_address():
    with pytest.raises(Exception, match="--api openai"):
        agents.main(["--quick", "--api", "openai", "--address", "127.0.0.1:1", "--policies", "semantic"])


@pytest.mark.slow
@requires_smollm2
def test_agents_quick_over_the_openai_api(tmp_path: Path, monkeypatch):
    """N=2 agents, 2 turns each, through a real server: every turn is a forced tool call, the
    returning turn finds its session's KV (cached_tokens), and the JSON has the native keys."""
    for k, v in TEST_CHILD_ENV.items():
        monkeypatch.setenv(k, v)
    assert agents.main(["--quick", "--api", "openai", "--n", "2", "--turns", "2", "--policies", "semantic",
                        "--no-progress", "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("agents-quick-openai-*.json"))
    assert len(files) == 1, files
    rec = json.loads(files[0].read_text())
    assert rec["params"]["api"] == "openai" and rec["params"]["mode"] == "http"
    assert rec["params"]["model"] == "smollm2-135m"
    (run,) = rec["results"]["runs"]
    assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
    assert DIST_KEYS <= set(run["turn_ms"]) and DIST_KEYS <= set(run["ttft_ms"])
    assert run["api"] == "openai" and run["planned_turns"] == 4 == len(run["turns"])
    assert run["ok_turns"] + sum(run["errors"].values()) == run["planned_turns"]
    assert run["timeline"] and run["peak_device_bytes"] is not None
    ok = [t for t in run["turns"] if t["ok"]]
    assert ok, run["errors"]
    for t in ok:
        assert t["latency_ms"] > 0 and t["compute_ms"] is not None and t["new_tokens"] > 0
        if t["turn"] > 0:
            # the session was found again: at least the first turn's prompt came from its KV
            assert t["history_tokens"] > 0 and t["cached_tokens"] > 0
    # `bench plot` reads the file as it is
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "figures")]) == 0
    assert list((tmp_path / "figures").glob("agents-quick-openai-*.png"))
