"""``GET /metrics``: Prometheus text from the engine's stats and the HTTP layer's own histograms.

Engine numbers are read at scrape time from ``Engine.stats()`` (sessions by phase, KV bytes by
tier, swaps, bytes moved, tokens); queue and turn latencies are observed per turn here. Keys the
engine does not report yet (swaps and bytes moved arrive with the memory module) read as 0.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _num(d: dict, *path, default=0):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d if isinstance(d, (int, float, dict)) else default


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        phases = GaugeMetricFamily("djinn_sessions", "Sessions by phase", labels=["phase"])
        for phase in ("ACTIVE", "IO_WAIT", "PAUSED"):
            phases.add_metric([phase], stats.get("sessions_by_phase", {}).get(phase, 0))
        for phase, n in stats.get("sessions_by_phase", {}).items():
            if phase not in ("ACTIVE", "IO_WAIT", "PAUSED"):
                phases.add_metric([phase], n)
        yield phases
        mem = stats.get("memory", {})
        kv = GaugeMetricFamily("djinn_kv_bytes", "KV cache bytes held, by tier", labels=["tier"])
        kv.add_metric(["device"], mem.get("kv_device", 0))
        kv.add_metric(["host"], mem.get("kv_host", mem.get("kv_parked", 0)))
        yield kv
        cap = GaugeMetricFamily("djinn_kv_capacity_bytes", "KV cache capacity, by tier", labels=["tier"])
        cap.add_metric(["device"], mem.get("kv_device_capacity", 0))
        cap.add_metric(["host"], mem.get("kv_host_capacity", 0))
        yield cap
        yield GaugeMetricFamily("djinn_weights_bytes", "Model weight bytes", value=mem.get("weights", 0))
        sharing = stats.get("sharing", {})
        yield GaugeMetricFamily("djinn_kv_shared_bytes",
                                "Device KV bytes in blocks shared by forks or common prefixes (counted once)",
                                value=sharing.get("kv_shared", 0))
        yield GaugeMetricFamily("djinn_kv_logical_bytes", "Device KV bytes the sessions would hold without sharing",
                                value=sharing.get("kv_unshared_equivalent", 0))
        yield GaugeMetricFamily("djinn_kv_sharing_ratio",
                                "Logical over physical device KV bytes (1 = nothing shared)",
                                value=sharing.get("sharing_ratio", 1.0))
        yield CounterMetricFamily("djinn_prefix_shared_blocks",
                                  "KV blocks taken from the prefix index instead of computed or copied",
                                  value=sharing.get("prefix_hits", 0))
        swaps = CounterMetricFamily("djinn_swaps", "KV swaps between device and host", labels=["direction"])
        raw = stats.get("swaps", mem.get("swaps", 0))
        for direction, n in (raw.items() if isinstance(raw, dict) else [("all", raw)]):
            swaps.add_metric([str(direction)], n)
        yield swaps
        moved = CounterMetricFamily("djinn_bytes_moved", "Bytes of KV moved between tiers", labels=["direction"])
        raw = stats.get("bytes_moved", mem.get("bytes_moved", 0))
        for direction, n in (raw.items() if isinstance(raw, dict) else [("all", raw)]):
            moved.add_metric([str(direction)], n)
        yield moved
        for key, doc in (("turns", "Generate turns"), ("tokens_generated", "Tokens generated"),
                         ("tokens_computed", "Tokens that went through the model")):
            yield CounterMetricFamily(f"djinn_{key}", doc, value=_num(stats, key))


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.queue = Histogram("djinn_queue_seconds", "Time a turn waited for the engine", registry=self.registry,
                               buckets=LATENCY_BUCKETS)
        self.turn_latency = Histogram("djinn_turn_seconds", "Time of a whole turn in the engine",
                                      registry=self.registry, buckets=LATENCY_BUCKETS)
        self.requests = Counter("djinn_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.cached = Counter("djinn_http_cached_tokens", "Prompt tokens served from a session's KV",
                              registry=self.registry)
        self.prompt = Counter("djinn_http_prompt_tokens", "Prompt tokens of HTTP turns", registry=self.registry)
        self.matched = Counter("djinn_http_session_matches", "How turns found their session", ["how"],
                               registry=self.registry)

    def turn(self, result, outcome) -> None:
        self.queue.observe(result.timings.get("queue_ms", 0.0) / 1e3)
        self.turn_latency.observe(result.timings.get("total_ms", 0.0) / 1e3)
        self.cached.inc(outcome.cached_tokens)
        self.prompt.inc(outcome.prompt_tokens)
        self.matched.labels(outcome.djinn.get("matched_by") or "new").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
