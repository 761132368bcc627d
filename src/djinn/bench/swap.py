"""``djinn bench swap``: parking and restoring session KV, against the link it runs over.

In one run, on one device:

1. ``link``: the raw pinned host<->device bandwidth, measured with big torch copies (1 GiB on
   CUDA) in each direction and both at once: the physical ceiling for everything below.
2. ``sizes``: one session's KV filled by a real prefill of 256, 1,024 and 4,096 tokens (the
   llama2-7b shape: 0.125, 0.5 and 2 GiB), then parked (``signal_phase("IO_WAIT")``) and restored
   (what the next request waits for) ``--repeat`` times: copy time on the copy stream (CUDA
   events), wall time, effective bandwidth and its ratio to the link.
3. ``signal``: ``signal_phase`` to copy start (the first copy enqueued on the copy stream), p50
   and p99, with the engine idle and while another session is decoding.
4. ``decode``: another session's decode step times while a 1,024-token session is parked and
   restored back to back (0.5 GB each way on llama2-7b), against the same steps with no copy.
5. ``--oversub``: many sessions whose KV totals more than the device budget (80 x 1,024 tokens of
   llama2-7b = 40 GB, with ``--gpu-memory 30GiB``), with IO_WAIT between short turns: every turn
   must complete and ``torch.cuda.max_memory_allocated()`` must stay within the budget.

``--quick`` runs tiny-llama on the CPU in seconds (the CI smoke test): the same code paths,
with host and device both in RAM.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import torch

from djinn.bench.common import percentile, record, sync, write
from djinn.client.embedded import resolve_device, resolve_dtype
from djinn.config import EngineConfig, MemoryConfig, default_home, parse_size
from djinn.engine import Engine, GenerateRequest, SamplingParams
from djinn.errors import DjinnError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench swap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokens", default="256,1024,4000", help="session sizes to park and restore (below the 4,096-token context)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--signals", type=int, default=200, help="signal_phase calls per latency measurement")
    p.add_argument("--gpu-memory", default=None, help="device budget (default: 90%% of the device)")
    p.add_argument("--host-memory", default="8GiB", help="pinned host arena (default 8GiB)")
    p.add_argument("--oversub", action="store_true", help="run the oversubscription experiment instead")
    p.add_argument("--sessions", type=int, default=80, help="--oversub: sessions")
    p.add_argument("--context", type=int, default=1024, help="--oversub: tokens of KV per session")
    p.add_argument("--rounds", type=int, default=2, help="--oversub: short turns per session after the first")
    p.add_argument("--quick", action="store_true", help="tiny-llama on the CPU in seconds: a smoke run")
    p.add_argument("--out", default=None)
    return p


def _ms(xs: list[float]) -> dict:
    xs = [x * 1e3 for x in xs]
    return {"p50": statistics.median(xs), "p99": percentile(xs, 99), "max": max(xs), "n": len(xs)}


# ---- 1. the link ----------------------------------------------------------------------------
def link_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> dict:
    """GB/s of big pinned host<->device copies (CPU: RAM to RAM), median of ``reps``."""
    if device.type != "cuda":
        a, b = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        b.copy_(a)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t)
        gbps = nbytes / statistics.median(times) / 1e9
        return {"bytes": nbytes, "h2d_gbps": gbps, "d2h_gbps": gbps, "both_gbps": None}
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    dev = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]

    def run(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Stream]]) -> float:
        best = []
        for _ in range(reps + 1):
            sync(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for dst, src, s in pairs:
                s.wait_event(start)
                with torch.cuda.stream(s):
                    dst.copy_(src, non_blocking=True)
            for _, _, s in pairs:
                torch.cuda.current_stream().wait_stream(s)
            end.record()
            end.synchronize()
            best.append(start.elapsed_time(end) / 1e3)
        return len(pairs) * nbytes / statistics.median(best[1:]) / 1e9

    out = {"bytes": nbytes,
           "h2d_gbps": run([(dev[0], host[0], streams[0])]),
           "d2h_gbps": run([(host[0], dev[0], streams[0])]),
           "both_gbps": run([(dev[0], host[0], streams[0]), (host[1], dev[1], streams[1])])}
    del host, dev
    return out


# ---- helpers over the engine ----------------------------------------------------------------
def _session_with_kv(engine: Engine, name: str, tokens: int, vocab: int, seed: int) -> str:
    """A session whose KV holds ``tokens`` tokens, filled by a real prefill."""
    sid = engine.open_session(name)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (tokens,), generator=g).tolist()
    engine.generate(sid, GenerateRequest(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True)))
    return sid


def _park(engine: Engine, sid: str) -> tuple[float, object]:
    """Park and wait; returns (wall seconds from the signal to completion observed, transfer)."""
    s = engine.sessions[sid]
    t0 = time.perf_counter()
    engine.signal_phase(sid, "IO_WAIT")
    tr = s.move.transfer if s.move is not None else engine.residency.pager.recent[-1]
    engine.residency.wait_idle(s)
    return time.perf_counter() - t0, tr


def _restore(engine: Engine, sid: str) -> tuple[float, object]:
    """Restore as a request does (ensure_resident inside begin_turn); returns (wall s, transfer)."""
    s = engine.sessions[sid]
    res = engine.residency
    t0 = time.perf_counter()
    res.begin_turn(s, s.num_cached)
    wall = time.perf_counter() - t0
    res.end_turn(s)
    return wall, res.pager.recent[-1]


# ---- 2. park / restore by size --------------------------------------------------------------
def sizes(engine: Engine, name: str, lm, tokens: list[int], repeat: int, link: dict) -> list[dict]:
    rows = []
    for n in tokens:
        sid = _session_with_kv(engine, name, n, lm.config.vocab_size, seed=n)
        parks, restores = [], []
        for _ in range(repeat):
            parks.append(_park(engine, sid))
            restores.append(_restore(engine, sid))
        nbytes = parks[0][1].nbytes
        park_copy = statistics.median(tr.copy_seconds for _, tr in parks)
        rest_copy = statistics.median(tr.copy_seconds for _, tr in restores)
        row = {
            "tokens": n, "bytes": nbytes, "blocks": parks[0][1].nblocks, "copies": parks[0][1].ncopies,
            "park_copy_ms": park_copy * 1e3, "park_wall_ms": statistics.median(w for w, _ in parks) * 1e3,
            "restore_copy_ms": rest_copy * 1e3, "restore_wall_ms": statistics.median(w for w, _ in restores) * 1e3,
            "park_gbps": nbytes / park_copy / 1e9, "restore_gbps": nbytes / rest_copy / 1e9,
        }
        row["park_ratio_to_link"] = row["park_gbps"] / link["d2h_gbps"]
        row["restore_ratio_to_link"] = row["restore_gbps"] / link["h2d_gbps"]
        rows.append(row)
        print(f"  {n:5d} tokens, {nbytes / 2**20:7.1f} MiB in {row['copies']} copies: park {row['park_copy_ms']:.2f} ms "
              f"({row['park_gbps']:.1f} GB/s, {row['park_ratio_to_link']:.0%} of link), restore "
              f"{row['restore_copy_ms']:.2f} ms ({row['restore_gbps']:.1f} GB/s, {row['restore_ratio_to_link']:.0%}); "
              f"a request waits {row['restore_wall_ms']:.2f} ms", flush=True)
        engine.close_session(sid)
    return rows


# ---- 3. signal -> copy start ----------------------------------------------------------------
def signal_latency(engine: Engine, name: str, lm, count: int, busy_sid: str | None = None) -> dict:
    """``signal_phase`` to the first copy enqueued, for parks (IO_WAIT) and prefetches (ACTIVE).
    With ``busy_sid``, another session decodes on the engine loop the whole time."""
    sid = _session_with_kv(engine, name, 256 if engine.runtimes[name].max_context > 512 else 64,
                           lm.config.vocab_size, seed=7)
    s = engine.sessions[sid]
    stop = threading.Event()
    worker = None
    if busy_sid is not None:
        def decode():
            while not stop.is_set():
                try:
                    engine.generate(busy_sid, GenerateRequest([5], SamplingParams(max_new_tokens=16, ignore_eos=True)))
                except Exception as exc:   # e.g. the context filled up: the measurement goes on idle
                    print(f"  (the decoding session stopped: {exc})", flush=True)
                    return
        worker = threading.Thread(target=decode, daemon=True)
        worker.start()
        time.sleep(0.05)
    lat = {"IO_WAIT": [], "ACTIVE": []}
    try:
        for _ in range(count):
            for phase in ("IO_WAIT", "ACTIVE"):
                t0 = time.perf_counter()
                engine.signal_phase(sid, phase)
                tr = s.move.transfer if s.move is not None else None
                engine.residency.wait_idle(s)     # (on CPU the copy thread stamps t_enqueued when it starts)
                if tr is not None:
                    lat[phase].append(tr.t_enqueued - t0)
    finally:
        stop.set()
        if worker is not None:
            worker.join()
    engine.close_session(sid)
    return {"park": _ms(lat["IO_WAIT"]), "prefetch": _ms(lat["ACTIVE"])}


# ---- 4. decode while copying ----------------------------------------------------------------
def decode_during_copies(engine: Engine, name: str, lm, context: int, new: int) -> dict:
    rt = engine.runtimes[name]
    a = _session_with_kv(engine, name, context, lm.config.vocab_size, seed=1)
    b_tokens = min(512, rt.max_context - 4 * (new + 2))
    b = _session_with_kv(engine, name, b_tokens, lm.config.vocab_size, seed=2)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)

    try:
        step_times_of(engine, name, b, params)          # warm-up
        idle = step_times_of(engine, name, b, params)
        stop = threading.Event()
        moved = []

        def pingpong():
            while not stop.is_set():
                w, tr = _park(engine, a)
                engine.signal_phase(a, "ACTIVE")        # prefetch back
                engine.residency.wait_idle(engine.sessions[a])
                moved.append((tr, engine.residency.pager.recent[-1]))

        th = threading.Thread(target=pingpong, daemon=True)
        th.start()
        time.sleep(0.02)
        t0 = time.perf_counter()
        busy = step_times_of(engine, name, b, params)
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        copy_s = sum(x.copy_seconds + y.copy_seconds for x, y in moved)
    finally:
        engine.close_session(a)
        engine.close_session(b)
    nbytes = moved[0][0].nbytes if moved else 0
    out = {"context_tokens": context, "bytes_per_copy": nbytes, "copies": 2 * len(moved),
           "link_busy_fraction": copy_s / wall if wall > 0 else None,
           "idle_step_ms": _ms(idle), "during_copies_step_ms": _ms(busy)}
    out["ratio_p50"] = out["during_copies_step_ms"]["p50"] / out["idle_step_ms"]["p50"]
    out["ratio_mean"] = statistics.mean(busy) / statistics.mean(idle)
    if lm.device.type == "cuda" and nbytes:
        out["raw_copies"] = raw = _decode_during_raw_copies(engine, name, lm, b_tokens, params, nbytes)
        out["ratio_vs_raw_p50"] = out["during_copies_step_ms"]["p50"] / raw["during_copies_step_ms"]["p50"]
    return out


def step_times_of(engine: Engine, name: str, sid: str, params: SamplingParams) -> list[float]:
    """Decode step intervals of one generate on ``sid`` (the first step, the prefill, left out)."""
    steps: list[float] = []
    hook = engine.runtimes[name].arch.lm_head.register_forward_hook(lambda *a: steps.append(time.perf_counter()))
    try:
        engine.generate(sid, GenerateRequest([7], params))
    finally:
        hook.remove()
    return [y - x for x, y in zip(steps[1:], steps[2:])]


def _decode_during_raw_copies(engine: Engine, name: str, lm, b_tokens: int, params: SamplingParams,
                              nbytes: int) -> dict:
    """The physical baseline for part 4: the same decode steps while plain PyTorch copies of the
    same size run back to back both ways between pinned host memory and the device on a side
    stream (no Djinn code at all), waited for with a blocking event. What this costs the decode
    is what the link and the GPU cost; whatever Djinn adds on top is its own overhead."""
    device = lm.device
    b = _session_with_kv(engine, name, b_tokens, lm.config.vocab_size, seed=2)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    stop, copies = threading.Event(), [0]

    def pingpong():
        while not stop.is_set():
            for dst, src in ((host, dev), (dev, host)):
                done = torch.cuda.Event(blocking=True)
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
                    done.record(stream)
                done.synchronize()
                copies[0] += 1

    try:
        step_times_of(engine, name, b, params)
        idle = step_times_of(engine, name, b, params)
        th = threading.Thread(target=pingpong, daemon=True)
        th.start()
        time.sleep(0.02)
        busy = step_times_of(engine, name, b, params)
        stop.set()
        th.join()
    finally:
        engine.close_session(b)
        del host, dev
    return {"copies": copies[0], "idle_step_ms": _ms(idle), "during_copies_step_ms": _ms(busy),
            "ratio_p50": statistics.median(busy) / statistics.median(idle)}


# ---- 5. oversubscription --------------------------------------------------------------------
def oversub(engine: Engine, name: str, lm, sessions: int, context: int, rounds: int, budget: int | None) -> dict:
    device = lm.device
    rng = random.Random(0)
    vocab = lm.config.vocab_size
    short = SamplingParams(max_new_tokens=4, ignore_eos=True)
    completed, restore_ms, queue_ms, failures = 0, [], [], []
    t0 = time.perf_counter()
    sids = []
    for i in range(sessions):
        sids.append(_session_with_kv(engine, name, context - 1, vocab, seed=1000 + i))
        completed += 1
        if i % 4:                                   # most signal; some are left for reactive eviction
            engine.signal_phase(sids[-1], "IO_WAIT")
        if (i + 1) % 10 == 0:
            print(f"  prefilled {i + 1}/{sessions} sessions ({time.perf_counter() - t0:.0f} s)", flush=True)
    for r in range(rounds):
        order = list(range(sessions))
        rng.shuffle(order)
        for i in order:
            if rng.random() < 0.5:
                engine.signal_phase(sids[i], "ACTIVE")
            try:
                out = engine.generate(sids[i], GenerateRequest([rng.randrange(3, vocab) for _ in range(8)], short))
            except DjinnError as exc:   # recorded, not hidden: every turn is expected to complete
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            completed += 1
            restore_ms.append(out.timings["restore_ms"] / 1e3)
            queue_ms.append(out.timings["queue_ms"] / 1e3)
            if rng.random() < 0.8:
                engine.signal_phase(sids[i], "IO_WAIT")
        print(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    stats = engine.stats()
    kv_total = sessions * (context + rounds * 12) * engine.runtimes[name].kv.token_bytes
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    for sid in sids:
        engine.close_session(sid)
    return {
        "sessions": sessions, "context_tokens": context, "turns_completed": completed,
        "turns_expected": sessions * (1 + rounds), "failures": failures[:20], "kv_demand_bytes": kv_total,
        "kv_device_capacity": stats["memory"]["kv_device_capacity"],
        "oversubscription": kv_total / stats["memory"]["kv_device_capacity"],
        "gpu_budget_bytes": budget, "max_memory_allocated": peak,
        "within_budget": None if peak is None or budget is None else peak <= budget,
        "restore_ms": _ms(restore_ms), "queue_ms": _ms(queue_ms), "seconds": time.perf_counter() - t0,
        "swaps": stats["swaps"], "bytes_moved": stats["bytes_moved"], "bandwidth_gbps": stats["bandwidth_gbps"],
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.model, args.device, args.repeat, args.signals = "tiny-llama", "cpu", 3, 30
        args.tokens, args.host_memory = "64,256,480", "64MiB"
        args.sessions, args.context, args.rounds = min(args.sessions, 16), 200, 1
    from djinn.models import load_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"djinn bench swap: {args.model} {dtype} on {device}", flush=True)
    t = time.perf_counter()
    lm = load_model(args.model, device=device, dtype=dtype, home=default_home())
    print(f"  loaded in {time.perf_counter() - t:.1f} s", flush=True)
    if args.oversub and args.gpu_memory is None and not args.quick:
        args.gpu_memory = "30GiB"
    if args.oversub and not args.quick and args.host_memory == "8GiB":
        args.host_memory = "40GiB"
    # semantic-park: every IO_WAIT parks, however short (semantic would keep the KV of these quick signals)
    mem = MemoryConfig(gpu_memory=args.gpu_memory, host_memory=args.host_memory, policy="semantic-park")
    if args.quick:   # tiny-llama blocks are 12 KiB; --oversub: a pool of 64 blocks for 16 x 13 blocks of KV
        mem.kv_blocks = 65 if args.oversub else 400
    engine = Engine({args.model: lm}, EngineConfig(memory=mem))
    arena = engine.residency.tiers[args.model].arena
    t = time.perf_counter()
    arena.wait_ready()
    print(f"  host arena {arena.total_bytes / 2**30:.2f} GiB ready after {time.perf_counter() - t:.1f} s "
          f"(pinning took {arena.pin_seconds:.1f} s); device KV pool "
          f"{engine.runtimes[args.model].pool.total_bytes / 2**30:.2f} GiB", flush=True)
    params = {**vars(args), "kv_pool_bytes": engine.runtimes[args.model].pool.total_bytes,
              "host_arena_bytes": arena.total_bytes, "host_pin_seconds": arena.pin_seconds,
              "block_bytes": engine.runtimes[args.model].kv.block_bytes,
              "kv_fill": "a real prefill of each session's prompt (random token ids)"}
    results: dict = {}
    try:
        if args.oversub:
            budget = parse_size(args.gpu_memory, torch.cuda.get_device_properties(device).total_memory
                                if device.type == "cuda" else None)
            print(f"oversubscription: {args.sessions} sessions x {args.context} tokens", flush=True)
            results["oversub"] = r = oversub(engine, args.model, lm, args.sessions, args.context, args.rounds, budget)
            print(f"  {r['turns_completed']}/{r['turns_expected']} turns completed; KV demand "
                  f"{r['kv_demand_bytes'] / 2**30:.1f} GiB = {r['oversubscription']:.1f}x the device KV pool; "
                  + (f"max_memory_allocated {r['max_memory_allocated'] / 2**30:.2f} GiB (budget {budget / 2**30:.0f} GiB, "
                     f"within: {r['within_budget']}); " if r["within_budget"] is not None else "")
                  + f"restore p50 "
                  f"{r['restore_ms']['p50']:.1f} ms p99 {r['restore_ms']['p99']:.1f} ms; swaps {r['swaps']}", flush=True)
        else:
            link_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
            results["link"] = link = link_bandwidth(device, link_bytes)
            print(f"link: h2d {link['h2d_gbps']:.1f} GB/s, d2h {link['d2h_gbps']:.1f} GB/s"
                  + (f", both {link['both_gbps']:.1f} GB/s" if link["both_gbps"] else ""), flush=True)
            print("park / restore by session size:", flush=True)
            tokens = [int(x) for x in args.tokens.split(",") if x]
            results["sizes"] = sizes(engine, args.model, lm, tokens, args.repeat, link)
            print("signal_phase -> copy start:", flush=True)
            results["signal_idle"] = sig = signal_latency(engine, args.model, lm, args.signals)
            print(f"  idle engine: park p50 {sig['park']['p50']:.3f} ms p99 {sig['park']['p99']:.3f} ms; "
                  f"prefetch p50 {sig['prefetch']['p50']:.3f} ms p99 {sig['prefetch']['p99']:.3f} ms", flush=True)
            busy = _session_with_kv(engine, args.model, 128, lm.config.vocab_size, seed=3)
            results["signal_during_decode"] = sig = signal_latency(engine, args.model, lm, args.signals, busy)
            engine.close_session(busy)
            print(f"  while another session decodes: park p50 {sig['park']['p50']:.3f} ms p99 "
                  f"{sig['park']['p99']:.3f} ms; prefetch p99 {sig['prefetch']['p99']:.3f} ms", flush=True)
            ctx = 1024 if lm.config.max_position_embeddings > 1024 else 400
            results["decode"] = d = decode_during_copies(engine, args.model, lm, ctx, 48)
            print(f"decode steps of another session while {d['bytes_per_copy'] / 2**20:.0f} MiB parks/restores run "
                  f"back to back (link busy {d['link_busy_fraction'] or 0:.0%}): p50 {d['during_copies_step_ms']['p50']:.2f} ms "
                  f"vs {d['idle_step_ms']['p50']:.2f} ms idle = {d['ratio_p50']:.3f}x (mean {d['ratio_mean']:.3f}x)",
                  flush=True)
            if "raw_copies" in d:
                r = d["raw_copies"]
                print(f"  plain PyTorch copies of the same size, no Djinn: p50 {r['during_copies_step_ms']['p50']:.2f} ms "
                      f"vs {r['idle_step_ms']['p50']:.2f} ms idle = {r['ratio_p50']:.3f}x; Djinn / plain "
                      f"{d['ratio_vs_raw_p50']:.3f}x", flush=True)
        results["engine_stats"] = engine.stats()
    finally:
        engine.shutdown()
    write(record("swap", device, params, results), args.out, stem="swap-oversub" if args.oversub else "swap")
    return 0
