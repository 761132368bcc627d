"""Turning what the agents saw into the numbers of ``djinn bench agents``.

Owns the per-turn record, the per-run summary, reading ``client.stats()`` defensively and the
memory sampler. Only the public client API is used: ``GenerateResult`` timings and token
counts, ``client.stats()``. A stats key that the server does not expose yet reads as None (the
candidate paths below list the names this harness understands; the first present wins).

Definitions (the JSON's field names):
- turn latency: the client's wall time of one ``generate`` call (queue + restore + compute);
- TTFT: ``timings["ttft_ms"]`` when the server reports it, else queue + restore + prefill;
- a returning turn (every turn after the first) is served without recompute when its
  ``cached_tokens`` covers the session's history (all earlier prompts and generated tokens,
  less the last generated token, which has never been through the model);
- success rate: turns that returned / turns planned (a failed turn ends its agent; its later
  turns count as failed, "abandoned"); a run cut by its time bound counts unrun turns as
  failed ("not_run") and says ``cut_short``.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from djinn.bench.common import percentile

# where each quantity may live in client.stats(); first present path wins
STAT_PATHS: dict[str, list[tuple[str, ...]]] = {
    "kv_device": [("memory", "kv_device")],
    "kv_device_capacity": [("memory", "kv_device_capacity")],
    "kv_device_high_water": [("memory", "kv_device_high_water")],
    "kv_host": [("memory", "kv_parked"), ("memory", "kv_host")],
    "kv_host_capacity": [("memory", "kv_host_capacity"), ("memory", "kv_parked_capacity"), ("memory", "host_capacity")],
    "kv_moving": [("memory", "kv_moving")],
    "host_ready": [("memory", "host_arena_ready")],
    "weights": [("memory", "weights")],
    # a number, or a dict by direction ({"out": ..., "in": ...}): summed by moved_bytes()
    "bytes_moved": [("bytes_moved",), ("memory", "bytes_moved"), ("swaps", "bytes_moved"), ("swaps", "bytes")],
    "bytes_to_host": [("bytes_parked",), ("bytes_to_host",), ("swaps", "bytes_to_host"), ("swaps", "bytes_out")],
    "bytes_to_device": [("bytes_restored",), ("bytes_to_device",), ("swaps", "bytes_to_device"), ("swaps", "bytes_in")],
    # the policy's choices: explicit decision counts, else the swap counters (out = parked, in =
    # restored, dropped, recomputed)
    "decisions": [("decisions",), ("policy", "decisions"), ("swaps",)],
    "sessions": [("sessions",)],
    "kv_shared": [("sharing", "kv_shared")],
    "sharing_ratio": [("sharing", "sharing_ratio")],
    "loop_slow": [("loop_slow",)],      # calls and steps that held the engine loop >= 0.25 s
}


def stat(stats: dict | None, name: str) -> Any:
    """The value of ``name`` in a stats dict, or None if this server does not report it."""
    for path in STAT_PATHS[name]:
        node: Any = stats
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def _total(x: Any) -> int | float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, dict):
        parts = [_total(v) for v in x.values()]
        parts = [p for p in parts if p is not None]
        return sum(parts) if parts else None
    return None


def moved_bytes(stats: dict | None) -> int | float | None:
    """All KV bytes moved between tiers so far (both directions), or None if not reported."""
    total = _total(stat(stats, "bytes_moved"))
    if total is None:
        parts = [_total(stat(stats, "bytes_to_host")), _total(stat(stats, "bytes_to_device"))]
        total = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
    return total


class GcPauses:
    """Pauses of Python's cyclic garbage collector during a run (it stops every thread of the
    process, engine included, while it runs): with an embedded engine, a latency tail that
    coincides with one is the collector's, not the policy's."""

    def __init__(self, slow_s: float = 0.05):
        self.slow_s, self.pauses, self._t = slow_s, [], None
        self._t0 = time.perf_counter()

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:   # a collection already running when we started listening has no start
            self.pauses.append((self._t - self._t0, time.perf_counter() - self._t, info.get("generation")))
            self._t = None

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        slow = [p for p in self.pauses if p[1] >= self.slow_s]
        return {"collections": len(self.pauses), "total_ms": sum(p[1] for p in self.pauses) * 1e3,
                "max_ms": max((p[1] for p in self.pauses), default=0.0) * 1e3,
                "slow": [{"at_s": round(at, 3), "ms": round(d * 1e3, 1), "generation": g} for at, d, g in slow[-32:]]}


def delta(after: Any, before: Any) -> Any:
    """after - before for numbers and (nested) dicts of numbers; None if either is missing."""
    if isinstance(after, dict):
        before = before if isinstance(before, dict) else {}
        return {k: delta(v, before.get(k, 0)) for k, v in after.items()}
    if isinstance(after, bool) or isinstance(before, bool):
        return None
    if isinstance(after, (int, float)) and isinstance(before, (int, float)):
        return after - before
    return None


def wait_host_ready(client, timeout_s: float = 180.0) -> float | None:
    """Wait until the server's host arena for parked KV is fully pinned (it may pin in the
    background after start-up), so runs don't measure its warm-up. Seconds waited; None if the
    server does not say."""
    t = time.perf_counter()
    while True:
        ready = stat(client.stats(), "host_ready")
        if ready is None:
            return None
        if ready or time.perf_counter() - t > timeout_s:
            return time.perf_counter() - t
        time.sleep(0.2)


@dataclass
class TurnRecord:
    agent: int
    turn: int
    ok: bool
    error: str | None = None           # error type name, "abandoned" or "not_run"
    start_s: float = 0.0               # seconds after the run started
    latency_ms: float | None = None    # client wall time of the generate call
    ttft_ms: float | None = None
    queue_ms: float | None = None
    restore_ms: float | None = None
    compute_ms: float | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    cached_tokens: int | None = None
    computed_tokens: int | None = None
    history_tokens: int = 0            # tokens the session held before this turn
    tool_s: float = 0.0                # the tool wait that preceded this turn

    @property
    def returning(self) -> bool:
        return self.turn > 0

    @property
    def no_recompute(self) -> bool | None:
        if not (self.ok and self.returning) or self.cached_tokens is None:
            return None
        return self.cached_tokens >= self.history_tokens - 1

    @classmethod
    def from_result(cls, agent: int, turn: int, start_s: float, wall_ms: float, res, history: int, prompt: int,
                    tool_s: float) -> "TurnRecord":
        t = dict(res.timings or {})
        ttft = t.get("ttft_ms")
        if ttft is None and "prefill_ms" in t:
            ttft = t.get("queue_ms", 0.0) + t.get("restore_ms", 0.0) + t["prefill_ms"]
        return cls(agent=agent, turn=turn, ok=True, start_s=start_s, latency_ms=wall_ms, ttft_ms=ttft,
                   queue_ms=t.get("queue_ms"), restore_ms=t.get("restore_ms"), compute_ms=t.get("compute_ms"),
                   prompt_tokens=prompt, new_tokens=len(res.token_ids), cached_tokens=res.cached_tokens,
                   computed_tokens=res.computed_tokens, history_tokens=history, tool_s=tool_s)

    def row(self) -> dict:
        d = asdict(self)
        d["no_recompute"] = self.no_recompute
        return d


def dist(xs: list[float]) -> dict[str, float | None]:
    """p50 / p99 / max / mean of ``xs`` (None when empty)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"p50": None, "p99": None, "max": None, "mean": None}
    return {"p50": percentile(xs, 50), "p99": percentile(xs, 99), "max": max(xs), "mean": sum(xs) / len(xs)}


def live_agents(spans: list[tuple[float, float]]) -> dict[str, float]:
    """Most and time-averaged number of agents alive at once, from (start, end) spans."""
    if not spans:
        return {"max": 0, "mean": 0.0}
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    live = peak = 0
    area, last = 0.0, events[0][0]
    for t, d in events:
        area += live * (t - last)
        last = t
        live += d
        peak = max(peak, live)
    span = events[-1][0] - events[0][0]
    return {"max": peak, "mean": area / span if span > 0 else float(peak)}


def summarize(records: list[TurnRecord], wall_s: float, planned: int, slo_ms: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "error"] = errors.get(r.error or "error", 0) + 1
    returning = [r for r in ok if r.returning]
    judged = [r.no_recompute for r in returning if r.no_recompute is not None]
    tokens = sum(r.new_tokens for r in ok)
    compute = [r.compute_ms for r in ok if r.compute_ms is not None]
    tools = [r.tool_s for r in records if r.returning and r.tool_s]
    mean_compute = sum(compute) / len(compute) if compute else None
    mean_tool = sum(tools) / len(tools) if tools else None
    turn = dist([r.latency_ms for r in ok])
    success = len(ok) / planned if planned else 0.0
    return {
        "planned_turns": planned, "ok_turns": len(ok), "failed_turns": planned - len(ok), "errors": errors,
        "success_rate": success,
        "turn_ms": turn, "ttft_ms": dist([r.ttft_ms for r in ok]), "queue_ms": dist([r.queue_ms for r in ok]),
        "restore_ms": dist([r.restore_ms for r in ok]), "compute_ms": dist(compute),
        "turns_per_min": len(ok) / wall_s * 60 if wall_s > 0 else None,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "returning_turns": len(returning), "returning_no_recompute": sum(1 for x in judged if x),
        "no_recompute_share": (sum(1 for x in judged if x) / len(judged)) if judged else None,
        "tool_s_mean": mean_tool, "compute_ms_mean": mean_compute,
        "tool_to_compute_ratio": (mean_tool * 1e3 / mean_compute) if mean_tool and mean_compute else None,
        "sustained": success == 1.0 and turn["p99"] is not None and turn["p99"] <= slo_ms,
    }


@dataclass
class MemorySampler:
    """Samples ``client.stats()`` every ``interval_s`` on a thread: device KV, host KV, budgets."""

    client: Any
    interval_s: float = 0.1
    samples: list[dict] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def start(self) -> "MemorySampler":
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        try:
            s = self.client.stats()
        except Exception:  # a sampler must never take the run down; count and go on
            self.errors += 1
            return
        self.samples.append({"t": time.perf_counter() - self._t0,
                             **{k: stat(s, k) for k in ("kv_device", "kv_host", "kv_device_capacity",
                                                        "kv_host_capacity", "kv_moving", "sessions",
                                                        "kv_shared", "sharing_ratio")}})

    def stop(self) -> list[dict]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self.sample()
        return self.samples

    def peak(self, key: str) -> int | None:
        vals = [s[key] for s in self.samples if isinstance(s.get(key), (int, float))]
        return max(vals) if vals else None


def downsample(samples: list[dict], most: int = 400) -> list[dict]:
    """At most ``most`` samples; each kept sample carries the max of its bucket, so peaks survive."""
    if len(samples) <= most:
        return samples
    out = []
    step = len(samples) / most
    for i in range(most):
        bucket = samples[int(i * step): max(int((i + 1) * step), int(i * step) + 1)]
        row = dict(bucket[0])
        for k in row:
            if k != "t":
                vals = [b[k] for b in bucket if isinstance(b.get(k), (int, float))]
                row[k] = max(vals) if vals else row[k]
        out.append(row)
    return out


def crossings(xs: list[float], a: list[float | None], b: list[float | None]) -> list[float]:
    """x values where the curves a(x) and b(x) cross (linear interpolation between points)."""
    out = []
    pts = [(x, ya - yb) for x, ya, yb in zip(xs, a, b) if ya is not None and yb is not None]
    for (x0, d0), (x1, d1) in zip(pts, pts[1:]):
        if d0 == 0:
            out.append(x0)
        elif d0 * d1 < 0:
            out.append(x0 + (x1 - x0) * d0 / (d0 - d1))
    if pts and pts[-1][1] == 0:
        out.append(pts[-1][0])
    return out


def loop_profile(d: dict | None, after: dict | None) -> dict[str, Any] | None:
    """Where the engine loop's time went during a run (from the stats delta ``d``): busy in
    batch steps (graph replays and eager forwards) and in calls, blocked waiting for room or a
    restore (part of those), idle; the mean batch; and the share of the device KV pool held by
    the turns being stepped. None when the server does not report it."""
    loop, b = (d or {}).get("loop"), (d or {}).get("batching")
    if not loop or not b or not loop.get("uptime_s"):
        return None
    up = loop["uptime_s"]
    steps = b.get("steps") or 0
    kinds, secs = b.get("steps_by_kind") or {}, b.get("step_s_by_kind") or {}
    items = sum(int(k) * v for k, v in (b.get("batch_sizes") or {}).items())
    pool = sum(x.get("used", 0) + x.get("free", 0) for x in ((after or {}).get("kv_blocks") or {}).values())
    return {
        "wall_s": up,
        "share": {"steps": loop.get("steps_s", 0.0) / up, "calls": loop.get("calls_s", 0.0) / up,
                  "blocked_room": loop.get("blocked_room_s", 0.0) / up,
                  "blocked_restore": loop.get("blocked_restore_s", 0.0) / up,
                  "blocked_lock": loop.get("blocked_lock_s", 0.0) / up,
                  "idle": max(0.0, 1 - (loop.get("steps_s", 0.0) + loop.get("calls_s", 0.0)) / up)},
        "steps": steps, "mean_batch": items / steps if steps else None,
        "step_ms": {k: 1e3 * secs.get(k, 0.0) / n for k, n in kinds.items() if n},
        "step_gpu_ms": {k: 1e3 * (b.get("step_gpu_s_by_kind") or {}).get(k, 0.0) / n
                        for k, n in kinds.items() if n and b.get("step_gpu_s_by_kind")},
        "steps_by_kind": kinds,
        "stepped_kv_share": (b.get("stepped_kv_blocks", 0) / steps / pool) if steps and pool else None,
    }


def wait_choices(decisions: dict | None) -> dict[str, Any] | None:
    """What the policy did with the IO_WAITs of one run, from the server's ``decisions``
    counters (their change over the run): how many waits kept their KV on the device, how many
    left it there as the first to go (standby) and how many of those were parked later for the
    reserve, how many were parked at once and why, the mean expected wait it used for each, and
    what its timers did. None when the server does not report IO_WAIT decisions."""
    if not isinstance(decisions, dict) or "keep" not in decisions or "io_wait" not in decisions:
        return None
    kept, parked, off = decisions.get("keep", 0), decisions.get("park", 0), decisions.get("off", 0)
    standby = decisions.get("standby", 0)
    decided = kept + standby + parked + off
    reasons = {k: v for k, v in (decisions.get("reasons") or {}).items() if v}
    no_estimate = reasons.get("no_estimate", 0)
    sums = decisions.get("expected_wait_s") or {}
    return {
        "io_waits": decisions.get("io_wait", 0), "kept": kept, "standby": standby, "parked": parked,
        "off_device": off, "reclaimed": decisions.get("reclaimed", 0),
        "dropped": decisions.get("drop", 0), "ignored": decisions.get("none", 0),
        "kept_share": kept / decided if decided else None,
        "standby_share": standby / decided if decided else None,
        "parked_share": (parked + off) / decided if decided else None,
        # among waits with an estimate: the first wait of a new session with no server-wide
        # estimate yet is never kept, whatever the tool
        "kept_share_estimated": kept / (decided - no_estimate) if decided - no_estimate > 0 else None,
        "reasons": reasons, "sources": {k: v for k, v in (decisions.get("sources") or {}).items() if v},
        # kept on the session's own history vs on the server-wide estimate (a session's first wait)
        "kept_by_source": dict(decisions.get("keep_sources") or {}),
        "mean_expected_wait_s": {k: (sums.get(k, 0.0) / n if n else None)
                                 for k, n in (("keep", kept), ("standby", standby),
                                              ("park", parked - reasons.get("no_estimate", 0)))},
        "prefetches": decisions.get("prefetch", 0), "prefetch_no_room": decisions.get("prefetch_no_room", 0),
        "late_parks": decisions.get("late_park", 0), "kept_evicted": decisions.get("kept_evicted", 0),
    }
