"""One run of ``djinn bench agents``: N agent threads against one client, measured.

Owns the agent loop and the run's time bound. An agent sleeps until its arrival, opens a
session, and for each turn: (after the first) signals IO_WAIT, waits its tool time, signals
ACTIVE; then generates with the tool output appended. Any exception of a turn (CapacityError
or anything else) is recorded, never raised: the agent stops there and its remaining turns
count as failed. Sessions are always closed, so the next run starts from an empty server.

Only the public client API is used (``model.session()``, ``generate``, ``signal_phase``,
``close``, ``client.stats()``), so the same code measures the embedded engine and a remote
``djinn serve``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from djinn.bench.metrics import (GcPauses, MemorySampler, TurnRecord, delta, downsample, live_agents, loop_profile,
                                 moved_bytes, stat, summarize)
from djinn.bench.workload import AgentPlan


@dataclass
class RunOptions:
    new_tokens: int
    deadline_s: float            # wall-clock bound of the run; unstarted turns then count as not run
    slo_ms: float                # p99 turn latency a sustained run stays under
    sample_s: float = 0.1        # memory timeline interval
    progress: bool = True
    label: str = ""
    cuda_peak: bool = False      # the engine is in this process on CUDA: read torch's peak allocation
    cuda_base: int = 0           # bytes allocated before this policy's engine started (not its own)


class _Progress:
    """A thread-safe tqdm bar (or nothing)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self._lock = threading.Lock()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="turn", mininterval=1.0, leave=False)

    def update(self, ok: bool) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(1)
                if not ok:
                    self._bar.set_postfix_str("failures", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _agent(model, plan: AgentPlan, opts: RunOptions, t0: float, stop: threading.Event,
           out: list[TurnRecord], spans: list[tuple[float, float]], bar: _Progress) -> None:
    def now() -> float:
        return time.perf_counter() - t0

    if stop.wait(max(0.0, plan.arrival_s - now())):
        out.extend(TurnRecord(plan.index, k, False, "not_run") for k in range(len(plan.prompts)))
        return
    started = now()
    history = 0
    sess = None
    k = 0
    try:
        sess = model.session()
        for k, prompt in enumerate(plan.prompts):
            tool = plan.tool_s[k - 1] if k > 0 else 0.0
            if k > 0:
                sess.signal_phase("IO_WAIT")
                stop.wait(tool)
                sess.signal_phase("ACTIVE")
            if stop.is_set() or now() > opts.deadline_s:
                break
            t = time.perf_counter()
            res = sess.generate(prompt, max_new_tokens=opts.new_tokens, ignore_eos=True)
            wall = (time.perf_counter() - t) * 1e3
            out.append(TurnRecord.from_result(plan.index, k, t - t0, wall, res, history, len(prompt), tool))
            bar.update(True)
            history += len(prompt) + len(res.token_ids)
        else:
            k = len(plan.prompts)
    except Exception as exc:  # a failed turn is data, not a crash
        out.append(TurnRecord(plan.index, k, False, type(exc).__name__, start_s=now(), history_tokens=history))
        bar.update(False)
        k += 1
        out.extend(TurnRecord(plan.index, j, False, "abandoned") for j in range(k, len(plan.prompts)))
        k = len(plan.prompts)
    finally:
        if sess is not None:
            try:
                sess.close()
            except Exception:  # the server may already be gone; the run's records stand
                pass
        spans.append((started, now()))
    out.extend(TurnRecord(plan.index, j, False, "not_run") for j in range(k, len(plan.prompts)))


def run_agents(client, model_name: str, plans: list[AgentPlan], opts: RunOptions) -> dict[str, Any]:
    """Run every agent of ``plans`` concurrently; return the run's summary, turns and timeline."""
    model = client.model(model_name)
    planned = sum(len(p.prompts) for p in plans)
    before = client.stats()
    if opts.cuda_peak:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = MemorySampler(client, opts.sample_s).start()
    stop = threading.Event()
    records: list[TurnRecord] = []
    spans: list[tuple[float, float]] = []
    bar = _Progress(planned, opts.label, opts.progress)
    gc_pauses = GcPauses()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=_agent, args=(model, p, opts, t0, stop, records, spans, bar),
                                name=f"agent-{p.index}", daemon=True) for p in plans]
    with gc_pauses:
        for th in threads:
            th.start()
        cut_short = False
        for th in threads:
            th.join(max(0.0, t0 + opts.deadline_s - time.perf_counter()))
            if th.is_alive():
                cut_short = True
                stop.set()
        # a generate already in flight when the bound hit finishes on the server; give it time
        grace_end = time.perf_counter() + max(30.0, min(opts.deadline_s, 120.0))
        for th in threads:
            th.join(max(0.0, grace_end - time.perf_counter()))
    wall = max((e for _, e in spans), default=time.perf_counter() - t0)
    timeline = sampler.stop()
    bar.close()
    after = client.stats()
    hung = [int(th.name.split("-")[1]) for th in threads if th.is_alive()]
    run = finish_run(plans, list(records), list(spans), hung, wall, cut_short, before, after, sampler, timeline, opts)
    run["gc_pauses"] = gc_pauses.summary()     # this process's collector (the engine's, when embedded)
    return run


def finish_run(plans: list[AgentPlan], records: list[TurnRecord], spans: list[tuple[float, float]], hung: list[int],
               wall: float, cut_short: bool, before: dict, after: dict, sampler: MemorySampler, timeline: list[dict],
               opts: RunOptions) -> dict[str, Any]:
    """The run's summary from what its agents recorded (shared by the native and the API runners)."""
    planned = sum(len(p.prompts) for p in plans)
    for idx in hung:  # agents that never came back: their turns did not complete
        done = {r.turn for r in records if r.agent == idx}
        records += [TurnRecord(idx, k, False, "hung") for k in range(len(plans[idx].prompts)) if k not in done]
    cut_short = cut_short or any(r.error == "not_run" for r in records)
    summary = summarize(records, wall, planned, opts.slo_ms)
    summary["sustained"] = summary["sustained"] and not cut_short
    moved = delta(moved_bytes(after), moved_bytes(before))
    peak_kv = sampler.peak("kv_device")
    weights = stat(after, "weights")
    if opts.cuda_peak:
        # less what was allocated before this engine started: an earlier policy's engine that
        # lingers (agents cut short at a deadline still hold its client) is not this one's memory
        peak = torch.cuda.max_memory_allocated() - opts.cuda_base
        source = "torch.cuda.max_memory_allocated less the allocation before this engine started"
    elif peak_kv is not None:
        peak, source = peak_kv + (weights or 0), "weights + sampled kv_device high-water"
    else:
        peak, source = None, None
    summary.update({
        "cuda_allocated_before_engine": opts.cuda_base if opts.cuda_peak else None,
        "wall_s": wall, "cut_short": cut_short, "hung_agents": len(hung),
        "live_agents": live_agents(spans),
        "peak_device_bytes": peak, "peak_device_source": source, "peak_kv_device_bytes": peak_kv,
        "peak_kv_host_bytes": sampler.peak("kv_host"),
        "peak_kv_shared_bytes": sampler.peak("kv_shared"), "peak_sharing_ratio": sampler.peak("sharing_ratio"),
        "bytes_moved": moved, "bytes_moved_split": delta(stat(after, "bytes_moved"), stat(before, "bytes_moved")),
        "server_kv_device_high_water": stat(after, "kv_device_high_water"),
        "bytes_moved_per_turn": (moved / summary["ok_turns"]) if moved and summary["ok_turns"] else
        (0.0 if moved == 0 else None),
        "decisions": delta(stat(after, "decisions"), stat(before, "decisions")),
        # the engine loop's slow calls and steps (at_s: seconds since the engine started)
        "loop_slow": stat(after, "loop_slow"),
        "loop": loop_profile(delta(after, before), after),
        "stats_delta": delta(after, before), "sampler_errors": sampler.errors,
        "turns": [r.row() for r in sorted(records, key=lambda r: (r.agent, r.turn))],
        "timeline": downsample(timeline),
    })
    return summary
