"""``djinn bench agents|resume|plot`` run end to end in-process on the CPU (the ``--quick``
presets) and leave the JSON and figures they promise. Timing values are never checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from djinn.bench import agents, plot, resume

from tests.conftest import requires_cuda

RUN_KEYS = {"policy", "tool", "n", "planned_turns", "ok_turns", "success_rate", "errors", "turn_ms", "ttft_ms",
            "queue_ms", "restore_ms", "compute_ms", "turns_per_min", "tokens_per_s", "peak_device_bytes",
            "bytes_moved", "no_recompute_share", "returning_turns", "live_agents", "turns", "timeline",
            "tool_to_compute_ratio", "sustained", "cut_short"}
DIST_KEYS = {"p50", "p99", "max", "mean"}


def _only(out: Path, pattern: str) -> dict:
    files = sorted(out.glob(pattern))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _check_agents(rec: dict, policies: list[str], ns: list[int]) -> None:
    assert rec["bench"] == "agents"
    assert rec["params"]["time_scale"] == 1.0 and rec["params"]["mode"] == "embedded"
    runs = rec["results"]["runs"]
    assert {(r["policy"], r["n"]) for r in runs} == {(p, n) for p in policies for n in ns}
    for r in runs:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert DIST_KEYS <= set(r["turn_ms"]) and DIST_KEYS <= set(r["ttft_ms"])
        assert r["planned_turns"] == r["n"] * rec["params"]["turns"] == len(r["turns"])
        assert r["ok_turns"] + sum(r["errors"].values()) == r["planned_turns"]
        assert 0.0 <= r["success_rate"] <= 1.0 and r["timeline"]
        assert r["peak_device_bytes"] is not None
        if r["policy"] == "resident":
            # resident never drops KV: every returning turn that completed reused the whole history
            assert all(t["no_recompute"] for t in r["turns"] if t["ok"] and t["turn"] > 0)
    assert set(rec["results"]["policies"]) == set(policies)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """One small agents run (two policies, N=2, two tool times) and one quick resume run."""
    out = tmp_path_factory.mktemp("bench")
    assert agents.main(["--quick", "--n", "2", "--policies", "semantic", "resident", "--no-progress",
                        "--tools", "fixed:0.01", "fixed:0.05", "--out", str(out)]) == 0
    assert resume.main(["--quick", "--no-progress", "--out", str(out)]) == 0
    return out


def test_agents_quick_subset_writes_json(out_dir):
    rec = _only(out_dir, "agents-quick-*.json")
    _check_agents(rec, ["semantic", "resident"], [2])
    assert {r["tool"] for r in rec["results"]["runs"]} == {"fixed:0.01", "fixed:0.05"}
    # a small device pool, but two agents of the quick shape fit: every turn completes
    assert all(r["success_rate"] == 1.0 for r in rec["results"]["runs"])


def test_agents_json_says_what_the_policy_did_with_each_io_wait(out_dir):
    rec = _only(out_dir, "agents-quick-*.json")
    turns = rec["params"]["turns"]
    assert rec["params"]["tool_classes_as_run_s"] == {"fixed:0.01": 0.01, "fixed:0.05": 0.05}
    for r in rec["results"]["runs"]:
        c = r["wait_choices"]
        # every IO_WAIT the agents signalled was decided once (each agent waits between its turns)
        assert c["io_waits"] == r["n"] * (turns - 1)
        if r["policy"] == "semantic":
            assert c["kept"] + c["standby"] + c["parked"] + c["off_device"] == c["io_waits"] and c["ignored"] == 0
            assert sum(c["reasons"].values()) == c["io_waits"]
            assert c["kept_share"] + c["standby_share"] + c["parked_share"] == pytest.approx(1.0)
        else:   # resident ignores the signal: nothing kept or parked by choice
            assert c["ignored"] == c["io_waits"] and c["kept"] == c["standby"] == c["parked"] == 0
    rows = rec["results"]["tool_classes"]
    assert {(x["policy"], x["tool"], x["n"]) for x in rows} == {(p, t, 2) for p in ("semantic", "resident")
                                                               for t in ("fixed:0.01", "fixed:0.05")}
    assert all(x["tool_as_run_s"] == x["tool_nominal_s"] for x in rows)     # the quick preset is not compressed


def test_resume_quick_writes_json(out_dir):
    rec = _only(out_dir, "resume-*.json")
    ctx = rec["results"]["context"]
    assert ctx["x"] == [64, 128, 256]
    for name in ("recompute (Djinn)", "Djinn restore", "resident (floor)", "recompute (transformers)",
                 "manual offload, pageable"):
        assert len(ctx["curves"][name]) == 3 and all(v is not None and v > 0 for v in ctx["curves"][name])
    for row in ctx["rows"]:
        assert {"recompute_ms", "restore_ms", "parked", "restore_runs"} <= set(row["djinn"])
        assert row["manual"]["offload_pinned"] is None     # CPU: no pinned memory, and the JSON says so
        assert row["manual"]["kv_bytes"] > 0
        # the restored session continued from its KV: only the 2 pending tokens went through the model
        assert all(r["computed_tokens"] == 2 for r in row["djinn"]["restore_runs"])
    depth = rec["results"]["depth"]
    assert depth["status"] in ("ok", "unavailable")
    if depth["status"] == "ok":
        assert depth["x"] == [1, 2, 3] and set(depth["curves"]) == {"recompute to the pause", "Djinn restore"}


@pytest.mark.slow
def test_agents_quick_full_sweep_and_plots(tmp_path):
    """The whole --quick preset (what CI-sized smoke means), then every figure from it."""
    assert agents.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    _check_agents(_only(tmp_path, "agents-quick-*.json"), ["semantic", "lru", "recompute", "resident"], [2, 4, 8])
    assert agents.main(["--quick", "--preset", "tools", "--no-progress", "--out", str(tmp_path)]) == 0
    assert resume.main(["--quick", "--no-progress", "--skip", "depth", "--out", str(tmp_path)]) == 0
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "fig")]) == 0
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    for stem in ("agents-quick-density", "agents-quick-cdf", "agents-quick-memory", "agents-tools-quick-choice",
                 "resume-crossover"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    tools = _only(tmp_path, "agents-tools-quick-*.json")["results"]["tool_classes"]
    semantic = [x for x in tools if x["policy"] == "semantic"]
    assert {(x["tool"], x["n"]) for x in semantic} == {(t, n) for t in ("fixed:0.01", "fixed:0.3") for n in (2, 4)}
    assert all(x["kept"] + x["parked"] + x["off_device"] == x["io_waits"] > 0 for x in semantic)


def test_plot_turns_json_into_pngs(out_dir, tmp_path):
    assert plot.main([str(out_dir), "--out", str(tmp_path / "fig")]) == 0
    pngs = {p.name for p in (tmp_path / "fig").glob("*.png")}
    assert pngs == {"agents-quick-density.png", "agents-quick-cdf.png", "agents-quick-memory.png",
                    "agents-quick-choice.png", "resume-crossover.png"}
    assert all(p.stat().st_size > 10_000 for p in (tmp_path / "fig").glob("*.png"))


def test_plot_of_an_empty_directory_says_so(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 1
    assert "nothing to plot" in capsys.readouterr().out


def _check_cuda_peak(run: dict) -> None:
    """A policy's CUDA peak is torch's reading less what was allocated before its engine started:
    other GPU tests of the same process (models cached by ``tests.conftest.loaded``, engines
    left running) hold device memory, so the allocation before is whatever they left, in any
    test order, and only the engine's own share is checked."""
    assert run["peak_device_source"].startswith("torch.cuda.max_memory_allocated")
    before = run["cuda_allocated_before_engine"]
    assert isinstance(before, int) and before >= 0
    assert run["peak_device_bytes"] > 0


def test_cuda_peak_check_holds_after_other_gpu_tests(monkeypatch):
    """Regression: the GPU test below compared the source with the bare
    "torch.cuda.max_memory_allocated", which the runner stopped reporting when it began leaving
    out earlier engines' memory; its check must hold whatever ran before (faked here on the CPU:
    512 MiB left by earlier tests, 3 MiB this engine's)."""
    from djinn.bench.agent_runner import RunOptions, finish_run
    from djinn.bench.metrics import MemorySampler

    earlier, own = 512 << 20, 3 << 20
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: earlier + own)
    opts = RunOptions(new_tokens=4, deadline_s=10.0, slo_ms=100.0, cuda_peak=True, cuda_base=earlier)
    run = finish_run([], [], [], [], 1.0, False, {}, {}, MemorySampler(None), [], opts)
    _check_cuda_peak(run)
    assert run["peak_device_bytes"] == own and run["cuda_allocated_before_engine"] == earlier


@pytest.mark.gpu
@requires_cuda
def test_cuda_paths_of_agents_and_resume(tmp_path):
    """The CUDA-only branches: torch's peak-memory reading and the pinned manual offload."""
    assert agents.main(["--quick", "--device", "cuda", "--n", "2", "--policies", "semantic", "--no-progress",
                        "--out", str(tmp_path)]) == 0
    run = _only(tmp_path, "agents-quick-*.json")["results"]["runs"][0]
    _check_cuda_peak(run)
    assert resume.main(["--model", "tiny-llama", "--device", "cuda", "--contexts", "64", "128", "--repeat", "1",
                        "--skip", "depth", "--host-memory", "16MiB", "--park-timeout-s", "1", "--no-progress",
                        "--out", str(tmp_path)]) == 0
    rec = _only(tmp_path, "resume-*.json")
    for row in rec["results"]["context"]["rows"]:
        pinned = row["manual"]["offload_pinned"]
        assert pinned["resume_ms"] > 0 and pinned["h2d_ms"] > 0
    assert "manual offload, pinned" in rec["results"]["context"]["curves"]


def test_agents_shared_prefix_quick_runs_sharing_on_and_off(tmp_path):
    assert agents.main(["--quick", "--preset", "shared-prefix", "--n", "4", "--no-progress", "--out", str(tmp_path)]) == 0
    rec = _only(tmp_path, "agents-shared-prefix-quick-*.json")
    assert rec["params"]["shared_prefix_tokens"] == 128 and rec["params"]["prefix_sharing"] == [True, False]
    runs = {r["policy"]: r for r in rec["results"]["runs"]}
    assert set(runs) == {"semantic sharing on", "semantic sharing off"}
    def reused(run):   # blocks taken from the prefix indexes (device or host) instead of computed or copied
        s = run["stats_delta"]["sharing"]
        return s["prefix_hits"] + s["prefix_host_hits"] + s["prefix_deduped"]

    assert reused(runs["semantic sharing on"]) > 0 and runs["semantic sharing on"]["peak_sharing_ratio"] >= 1.0
    assert reused(runs["semantic sharing off"]) == 0 and runs["semantic sharing off"]["peak_sharing_ratio"] == 1.0
    assert set(rec["results"]["prefix_sharing"]["semantic"]) == {"on", "off"}
