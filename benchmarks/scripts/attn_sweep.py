"""Sweep of the paged attention kernels' launch configs on one GPU, to fill the tables of
``src/djinn/attention/triton_paged.py`` (``DECODE_TABLE``, ``PREFILL_CONFIG``) and choose the
prefill chunk size from measurements.

Decode (llama2-7b: 32 q / 32 kv heads; mistral-7b: 32 / 8; D 128, fp16, pages of 16 tokens in
a pool whose blocks hold 2 layers, so one layer's K is a strided view as in Djinn): at batch
{1..64} x context {1K, 4K, 16K}, candidate configs (splits, key tile, warps, stages, tl.dot or
CUDA-core scores) searched per batch: splits at one tile; every tile at the best splits;
splits at the best tile; then the rest of the splits x tiles grid while the batch's share of
the budget lasts. Each measurement is a CUDA graph of calls that read different sequences (more
K/V than L2 holds, as one step's 32 layers do), replayed; us per call, GB/s = K+V bytes / time,
% of the HBM bandwidth of a 1 GiB device copy (bytes read + written) measured in the same run.
SDPA on contiguous K/V of the same shape is the reference; eager times (launch overhead
included) are reported for the current choice, the table's pick and SDPA. Every candidate's
output is checked against float32 attention of the same paged data; a wrong one is excluded.
A graph replays one launch for any context, so the table's pick per batch is the config whose
time, over the contexts, is closest to each context's best (mean ratio).

Prefill (llama2-7b, then mistral-7b if time is left): chunks {512, 1K, 2K} at offsets {0, 4K,
12K} for candidate (block_m, block_n, warps, stages), TFLOP/s against SDPA (flash, causal aligned
to the bottom right) on contiguous K/V of the same shape; then the attention of a 16K-token
recompute of one layer (chunks in a graph) for every config and chunk size, against one SDPA
causal call over 16K (transformers' way).

    python benchmarks/scripts/attn_sweep.py [--out FILE.json] [--budget-s 180]

About 3.5 minutes on an H200; ``--budget-s`` caps the measuring (rounds that do not fit are
cut and listed). ``--smoke``: tiny shapes on CPU through Triton's interpreter (tests the script).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from djinn.attention import triton_paged as tp
from djinn.attention.base import SeqSpan
from djinn.attention.triton_paged import DecodeConfig, PrefillConfig

MODELS = {"llama2-7b": (32, 32, 128), "mistral-7b": (32, 8, 128)}    # q heads, kv heads, head_dim
PAGE = 16
LAYERS = 2
L2_BYTES = 50 << 20
TOL = 2e-2          # max |error| of an fp16 output against float32 attention of the same data

# tile candidates (block_n, num_warps, num_stages); spilling ones (sm_90 compile) left out. Scores
# on the CUDA cores keep no stages (their loads are not pipelined through shared memory)
DOT_TILES = [(64, 4, 2), (32, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2), (128, 4, 3), (16, 4, 2)]
CORE_TILES = {True: [(16, 4, 1), (32, 4, 1), (64, 4, 1), (64, 8, 1), (128, 8, 1)],     # MHA
              False: [(16, 4, 1), (16, 8, 1), (32, 8, 1)]}                              # GQA
PREFILL_CANDIDATES = [PrefillConfig(64, 64, 4, 2), PrefillConfig(64, 64, 4, 3), PrefillConfig(64, 32, 4, 3),
                      PrefillConfig(64, 64, 8, 3), PrefillConfig(64, 128, 8, 2), PrefillConfig(128, 64, 8, 2),
                      PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 32, 8, 3), PrefillConfig(128, 128, 8, 2)]


def log(*a):
    print(*a, flush=True)


class Clock:
    """Microseconds per call of a list of calls, graph-replayed or eager (median of 3 samples)."""

    def __init__(self, device: torch.device, target_ms: float):
        self.cuda = device.type == "cuda"
        self.target_ms = target_ms
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None

    def _time(self, run, n_calls: int) -> float:
        if not self.cuda:
            t = time.perf_counter()
            run()
            return (time.perf_counter() - t) * 1e6 / n_calls
        run()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        reps = max(1, min(100, int(self.target_ms / 3 / max(a.elapsed_time(b), 1e-3))))
        samples = []
        for _ in range(3):
            a.record()
            for _ in range(reps):
                run()
            b.record()
            torch.cuda.synchronize()
            samples.append(a.elapsed_time(b) * 1e3 / (reps * n_calls))
        return sorted(samples)[1]

    def eager(self, fns) -> float:
        def run():
            for f in fns:
                f()
        return self._time(run, len(fns))

    def graph(self, fns) -> float:
        if not self.cuda:
            return self.eager(fns)
        for f in fns:
            f()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            for f in fns:
                f()
        try:
            return self._time(g.replay, len(fns))
        finally:
            del g


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.monotonic()
        self.end = self.t0 + seconds

    def now(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.end - time.monotonic()


def copy_gbps(device: torch.device, clock: Clock) -> float:
    n = (8 << 20) if SMOKE else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    us = clock.eager([lambda: dst.copy_(src)])
    return 2 * n / us / 1e3


def cfg_name(c) -> str:
    if isinstance(c, DecodeConfig):
        return f"s{c.splits} n{c.block_n} w{c.num_warps} st{c.num_stages} {'dot' if c.dot else 'core'}"
    return f"m{c.block_m} n{c.block_n} w{c.num_warps} st{c.num_stages}"


def attention_f32(q, k, v, scale):
    """q [H, D], k/v [L, KVH, D] -> [H, D] in float32 (the oracle of a decode entry)."""
    g = q.shape[0] // k.shape[1]
    k = k.float().repeat_interleave(g, dim=1)
    v = v.float().repeat_interleave(g, dim=1)
    w = torch.softmax(torch.einsum("hd,lhd->hl", q.float(), k) * scale, -1)
    return torch.einsum("hl,lhd->hd", w, v)


# ---- decode ---------------------------------------------------------------------------------
class DecodeBench:
    def __init__(self, name, shape, args, device, clock, hbm):
        self.name, (self.H, self.KVH, self.D) = name, shape
        self.args, self.device, self.clock, self.hbm = args, device, clock, hbm
        self.scale = self.D ** -0.5
        self.pages = max(args.batches) * max(args.contexts) // PAGE
        pool = torch.empty(self.pages + 1, LAYERS, 2, PAGE, self.KVH, self.D, dtype=torch.float16, device=device)
        pool.normal_()
        self.pool = pool
        self.kc, self.vc = pool[:, LAYERS - 1, 0], pool[:, LAYERS - 1, 1]
        self.perm = (torch.randperm(self.pages, device=device) + 1).to(torch.int32)   # never block 0
        shape = (max(args.batches), self.KVH, max(args.contexts), self.D)
        self.kfull = torch.randn(shape, dtype=torch.float16, device=device)
        self.vfull = torch.randn(shape, dtype=torch.float16, device=device)

    def point(self, b: int, ctx: int) -> dict:
        per = ctx // PAGE
        rows = self.pages // per
        tables = self.perm[: rows * per].view(rows, per)
        kv_bytes = 2 * b * ctx * self.KVH * self.D * 2
        n_calls = max(1, min(rows // b, 64, math.ceil(4 * L2_BYTES / kv_bytes)))
        seqs = [torch.arange(i * b, (i + 1) * b, dtype=torch.int32, device=self.device) for i in range(n_calls)]
        q = torch.randn(b, self.H, self.D, dtype=torch.float16, device=self.device)
        ref = []
        for i in range(min(b, 2)):
            idx = tables[i].long()
            ref.append(attention_f32(q[i], self.kc[idx].flatten(0, 1), self.vc[idx].flatten(0, 1), self.scale))
        return dict(b=b, ctx=ctx, tables=tables, kv_bytes=kv_bytes, seqs=seqs, q=q, ref=torch.stack(ref),
                    lens=torch.full((b,), ctx, dtype=torch.int32, device=self.device))

    def fns(self, p, cfg):
        return [lambda s=s: tp.paged_decode(p["q"], self.kc, self.vc, p["tables"], s, p["lens"], self.scale,
                                            config=cfg) for s in p["seqs"]]

    def measure(self, p, cfg) -> dict:
        rec = {"config": asdict(cfg), "name": cfg_name(cfg)}
        try:
            # into NaNs: a freshly allocated output could hold a previous config's right answer
            out = torch.full_like(p["q"], math.nan)
            tp.paged_decode(p["q"], self.kc, self.vc, p["tables"], p["seqs"][0], p["lens"], self.scale, config=cfg,
                            out=out)
            err = (out[: p["ref"].shape[0]].float() - p["ref"]).abs().max().item()
            rec["err"] = err
            if not math.isfinite(err) or err > TOL:
                rec["invalid"] = f"max error {err:.3g} against float32 attention"
                return rec
            us = self.clock.graph(self.fns(p, cfg))
        except Exception as e:          # a config the GPU refuses (resources): recorded, skipped
            rec["invalid"] = f"{type(e).__name__}: {str(e)[:200]}"
            return rec
        rec.update(us=us, gbps=p["kv_bytes"] / us / 1e3, pct_hbm=100 * p["kv_bytes"] / us / 1e3 / self.hbm)
        return rec

    def sdpa(self, p, eager: bool) -> float:
        b, ctx = p["b"], p["ctx"]
        q4 = p["q"][:, :, None]
        sets = max(1, min(len(p["seqs"]), self.kfull.shape[0] // b))
        gqa = self.KVH != self.H
        fns = [lambda i=i: F.scaled_dot_product_attention(q4, self.kfull[i * b:(i + 1) * b, :, :ctx],
                                                           self.vfull[i * b:(i + 1) * b, :, :ctx],
                                                           scale=self.scale, enable_gqa=gqa)
               for i in range(sets)]
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return self.clock.eager(fns) if eager else self.clock.graph(fns)
        except Exception as e:
            log(f"  SDPA b{b} ctx {ctx}: {type(e).__name__}: {str(e)[:120]}")
            return math.nan

    def eager(self, p, cfg) -> float:
        try:
            return self.clock.eager(self.fns(p, cfg))
        except Exception:
            return math.nan

    def splits_options(self, b: int) -> list[int]:
        items, sms = b * self.KVH, tp._sm_count(self.device)
        return [s for s in (1, 2, 4, 8, 16, 32, 64) if s == 1 or items * s <= 8 * sms]

    def tiles(self) -> list[DecodeConfig]:
        out = [DecodeConfig(1, n, w, st, True) for n, w, st in DOT_TILES]
        core = [DecodeConfig(1, n, w, st, False) for n, w, st in CORE_TILES[self.KVH == self.H]]
        return out[:2] + core[:1] if SMOKE else out + core

    def precompile(self, budget: Budget):
        """First launch of every tile config (one and several splits) before any timing."""
        t = time.monotonic()
        p = self.point(1, min(self.args.contexts))
        for cfg in self.tiles():
            for s in (1, 2):
                if budget.left() < 0:
                    return
                try:
                    tp.paged_decode(p["q"], self.kc, self.vc, p["tables"], p["seqs"][0], p["lens"], self.scale,
                                    config=replace(cfg, splits=s))
                except Exception as e:
                    log(f"  {cfg_name(cfg)}: {type(e).__name__}: {str(e)[:120]}")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        log(f"  compiled {len(self.tiles())} tile configs in {time.monotonic() - t:.1f} s")

    def batch(self, b: int, deadline: float) -> dict:
        """Search at batch b over all contexts; returns per-context records and the table's pick."""
        pts = [self.point(b, c) for c in self.args.contexts]
        meas: dict[DecodeConfig, dict[int, dict]] = {}

        def run(cfgs):
            for cfg in cfgs:
                if cfg in meas:
                    continue
                if time.monotonic() > deadline:
                    return False
                meas[cfg] = {p["ctx"]: self.measure(p, cfg) for p in pts}
            return True

        def best_ctx(ctx):
            ok = [m[ctx]["us"] for m in meas.values() if "us" in m[ctx]]
            return min(ok) if ok else math.inf

        def score(cfg):
            rs = [meas[cfg][c]["us"] / best_ctx(c) if "us" in meas[cfg][c] else math.inf for c in self.args.contexts]
            return sum(rs) / len(rs), max(rs)

        def pick(cfgs):
            cfgs = [c for c in cfgs if c in meas]
            return min(cfgs, key=lambda c: score(c)[0]) if cfgs else None

        current = tp.decode_config(b, self.KVH, self.H // self.KVH, self.D, self.device)
        heuristic = tp._heuristic(b * self.KVH, self.D, self.device)
        run([current, heuristic])
        base = DecodeConfig(1, *DOT_TILES[0], True)
        opts = self.splits_options(b)
        complete = run([replace(base, splits=s) for s in opts])
        s_a = (pick([replace(base, splits=s) for s in opts]) or heuristic).splits
        complete = complete and run([replace(c, splits=s_a) for c in self.tiles()])
        tile = pick([replace(c, splits=s_a) for c in self.tiles()]) or replace(base, splits=s_a)
        complete = complete and run([replace(tile, splits=s) for s in opts])
        # then the rest of the grid while this batch's time lasts, the tiles that did best first
        ranked = sorted(self.tiles(), key=lambda c: score(replace(c, splits=s_a))[0] if replace(c, splits=s_a) in meas
                        else math.inf)
        complete = complete and run([replace(c, splits=s) for c in ranked for s in opts])
        chosen = pick(list(meas)) or current
        out = {"batch": b, "complete": complete, "measured": len(meas), "grid": len(opts) * len(self.tiles()),
               "current": asdict(current), "chosen": asdict(chosen),
               "chosen_name": cfg_name(chosen), "chosen_mean_ratio": score(chosen)[0],
               "chosen_max_ratio": score(chosen)[1], "points": []}
        for p in pts:
            c = p["ctx"]
            valid = [m[c] for m in meas.values() if "us" in m[c]]
            best = min(valid, key=lambda r: r["us"]) if valid else {"name": "none valid"}
            row = {"context": c, "kv_bytes": p["kv_bytes"], "calls_per_graph": len(p["seqs"]),
                   "sdpa_graph_us": self.sdpa(p, False), "sdpa_eager_us": self.sdpa(p, True),
                   "current": meas[current][c], "best": best, "chosen": meas[chosen][c],
                   "current_eager_us": self.eager(p, current), "chosen_eager_us": self.eager(p, chosen),
                   "candidates": [m[c] for m in meas.values()]}
            out["points"].append(row)
        return out


def decode_section(args, device, clock, hbm, budget: Budget, seconds: float) -> dict:
    res = {}
    models = list(MODELS.items())
    t_end = time.monotonic() + seconds
    for mi, (name, shape) in enumerate(models):
        if SMOKE:
            shape = (4, 4 if name.startswith("llama") else 2, 32)
        model_end = time.monotonic() + (t_end - time.monotonic()) / (len(models) - mi)
        log(f"\n== decode {name}: {shape[0]} q heads, {shape[1]} kv heads, D {shape[2]}, fp16, page {PAGE}")
        bench = DecodeBench(name, shape, args, device, clock, hbm)
        bench.precompile(budget)
        rows = []
        for bi, b in enumerate(args.batches):
            deadline = time.monotonic() + max(1.0, (model_end - time.monotonic()) / (len(args.batches) - bi))
            r = bench.batch(b, deadline)
            rows.append(r)
            print_batch(r, hbm)
        res[name] = {"shape": {"heads": shape[0], "kv_heads": shape[1], "head_dim": shape[2]}, "batches": rows}
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def print_batch(r: dict, hbm: float):
    for p in r["points"]:
        cur, best, ch = p["current"], p["best"], p["chosen"]

        def f(m):
            return f"{m['us']:7.1f} {m['pct_hbm']:3.0f}%" if "us" in m else "    n/a    "
        log(f"  b{r['batch']:<3} ctx {p['context']:>5} | sdpa {p['sdpa_graph_us']:7.1f} | current {f(cur)} | "
            f"best {f(best)} {best['name']:<24} | table {f(ch)} | eager: current {p['current_eager_us']:7.1f} "
            f"table {p['chosen_eager_us']:7.1f} sdpa {p['sdpa_eager_us']:7.1f}")
    log(f"  b{r['batch']:<3} table pick: {r['chosen_name']} (mean {r['chosen_mean_ratio']:.2f}x, worst "
        f"{r['chosen_max_ratio']:.2f}x of each context's best; {r['measured']} configs measured, grid "
        f"{r['grid']}{'' if r['complete'] else ', cut by the budget'})")


def decode_table_text(decode: dict) -> str:
    lines = ["DECODE_TABLE = {"]
    for name, m in decode.items():
        kvh, h, d = m["shape"]["kv_heads"], m["shape"]["heads"], m["shape"]["head_dim"]
        lines.append(f"    # {name}: bound = batch x {kvh} kv heads")
        lines.append(f"    ({d}, {h // kvh > 1}): (")
        for r in m["batches"]:
            c = r["chosen"]
            lines.append(f"        ({r['batch'] * kvh}, DecodeConfig(splits={c['splits']}, block_n={c['block_n']}, "
                         f"num_warps={c['num_warps']}, num_stages={c['num_stages']}, dot={c['dot']})),")
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


# ---- prefill --------------------------------------------------------------------------------
def prefill_model(name, shape, args, device, clock, deadline, candidates) -> dict:
    H, KVH, D = shape
    scale = D ** -0.5
    n_total = args.recompute
    pages = n_total // PAGE
    pool = torch.empty(pages + 1, LAYERS, 2, PAGE, KVH, D, dtype=torch.float16, device=device).normal_()
    kc, vc = pool[:, LAYERS - 1, 0], pool[:, LAYERS - 1, 1]
    table_list = (torch.randperm(pages) + 1).tolist()
    tables = torch.tensor([table_list], dtype=torch.int32, device=device)
    k_all = kc[tables[0].long()].flatten(0, 1)          # [n_total, KVH, D]: the same data, contiguous
    v_all = vc[tables[0].long()].flatten(0, 1)
    g = H // KVH
    # flash (or memory-efficient) as transformers gets them; the CPU smoke run needs the math kernel
    sdpa_backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] + ([SDPBackend.MATH] if SMOKE else [])

    def contiguous(t, n):     # [1, H, n, D], K/V heads repeated for GQA (transformers' repeat_kv)
        return t[:n].transpose(0, 1).repeat_interleave(g, dim=0)[None].contiguous()

    def flops(n, off):
        return 4 * D * H * (n * off + n * (n + 1) / 2)

    points = []
    for n in args.chunks:
        for off in args.offsets:
            if off + n > n_total:
                continue
            q = torch.randn(n, H, D, dtype=torch.float16, device=device)
            q4 = q.transpose(0, 1)[None].contiguous()
            k4, v4 = contiguous(k_all, off + n), contiguous(v_all, off + n)
            mask = causal_lower_right(n, off + n)
            with sdpa_kernel(sdpa_backends):
                ref = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)[0].transpose(0, 1)
                sdpa_us = clock.graph([lambda: F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask,
                                                                              scale=scale)])
            row = {"chunk": n, "offset": off, "gflop": flops(n, off) / 1e9, "sdpa_us": sdpa_us,
                   "sdpa_tflops": flops(n, off) / sdpa_us / 1e6, "candidates": []}
            out = torch.empty_like(q)
            span = SeqSpan(off, n, table_list)
            for cfg in candidates:
                rec = {"config": asdict(cfg), "name": cfg_name(cfg)}
                if time.monotonic() > deadline:
                    rec["invalid"] = "skipped: budget"
                    row["candidates"].append(rec)
                    continue
                tiles = tp.prefill_tiles([span], [0], [0], device, block_m=cfg.block_m)
                fn = [lambda: tp.paged_prefill(q, kc, vc, tables, tiles, scale, out=out, config=cfg)]
                try:
                    out.fill_(math.nan)      # a config that stores nothing must not pass on stale rows
                    fn[0]()
                    err = (out.float() - ref.float()).abs().max().item()
                    rec["err"] = err
                    if not math.isfinite(err) or err > TOL:
                        rec["invalid"] = f"max error {err:.3g} against SDPA"
                    else:
                        us = clock.graph(fn)
                        rec.update(us=us, tflops=flops(n, off) / us / 1e6)
                except Exception as e:
                    rec["invalid"] = f"{type(e).__name__}: {str(e)[:200]}"
                row["candidates"].append(rec)
            points.append(row)
            ok = [c for c in row["candidates"] if "us" in c]
            best = min(ok, key=lambda c: c["us"]) if ok else None
            cur = row["candidates"][0]
            log(f"  chunk {n:>5} at {off:>5} | sdpa {sdpa_us / 1e3:7.3f} ms {row['sdpa_tflops']:5.0f} TF/s | current "
                + (f"{cur['us'] / 1e3:7.3f} ms {cur['tflops']:5.0f} TF/s" if "us" in cur else "n/a")
                + (f" | best {best['us'] / 1e3:7.3f} ms {best['tflops']:5.0f} TF/s {best['name']}" if best else ""))
            del k4, v4

    # one layer's attention of a whole recompute: chunks at offsets 0, n, 2n, ... in one graph
    recompute = {"tokens": n_total, "configs": []}
    qa = torch.randn(n_total, H, D, dtype=torch.float16, device=device)
    k4, v4 = contiguous(k_all, n_total), contiguous(v_all, n_total)
    q4 = qa.transpose(0, 1)[None].contiguous()
    with sdpa_kernel(sdpa_backends):
        recompute["sdpa_causal_ms"] = clock.graph([lambda: F.scaled_dot_product_attention(
            q4, k4, v4, is_causal=True, scale=scale)]) / 1e3
    del k4, v4
    outa = torch.empty_like(qa)
    for n in args.chunks:
        for cfg in candidates:
            rec = {"chunk": n, "config": asdict(cfg), "name": cfg_name(cfg)}
            if time.monotonic() > deadline:
                rec["invalid"] = "skipped: budget"
                recompute["configs"].append(rec)
                continue
            fns = []
            for s in range(0, n_total, n):
                tiles = tp.prefill_tiles([SeqSpan(s, n, table_list)], [0], [0], device, block_m=cfg.block_m)
                fns.append(lambda s=s, tiles=tiles: tp.paged_prefill(qa[s:s + n], kc, vc, tables, tiles, scale,
                                                                     out=outa[s:s + n], config=cfg))
            try:
                rec["ms"] = clock.graph(fns) * len(fns) / 1e3
            except Exception as e:
                rec["invalid"] = f"{type(e).__name__}: {str(e)[:200]}"
            recompute["configs"].append(rec)
    ok = [r for r in recompute["configs"] if "ms" in r]
    cur = [r for r in ok if r["config"] == asdict(tp.PREFILL_CONFIG)]
    for n in args.chunks:
        at = [r for r in ok if r["chunk"] == n]
        if at:
            best = min(at, key=lambda r: r["ms"])
            now = [r for r in cur if r["chunk"] == n]
            log(f"  recompute {n_total} tokens in chunks of {n:>5}: best {best['ms']:7.2f} ms ({best['name']})"
                + (f", current {now[0]['ms']:7.2f} ms" if now else "")
                + f" | SDPA causal over all {recompute['sdpa_causal_ms']:7.2f} ms")
    recompute["best"] = min(ok, key=lambda r: r["ms"]) if ok else None
    del pool
    return {"shape": {"heads": H, "kv_heads": KVH, "head_dim": D}, "points": points, "recompute": recompute}


def prefill_section(args, device, clock, budget: Budget, seconds: float) -> dict:
    res = {}
    t_end = time.monotonic() + seconds
    cands = PREFILL_CANDIDATES
    if SMOKE:
        cands = [PrefillConfig(16, 16, 4, 2), PrefillConfig(32, 16, 4, 3)]
    if tp.PREFILL_CONFIG not in cands:
        cands = [tp.PREFILL_CONFIG] + cands
    else:
        cands = [tp.PREFILL_CONFIG] + [c for c in cands if c != tp.PREFILL_CONFIG]
    for i, (name, shape) in enumerate(MODELS.items()):
        if SMOKE:
            shape = (4, 4 if name.startswith("llama") else 2, 32)
        if time.monotonic() > t_end:
            log(f"\n== prefill {name}: skipped (budget)")
            continue
        log(f"\n== prefill {name}: {shape[0]} q heads, {shape[1]} kv heads, D {shape[2]}, fp16 "
            f"(ms per layer; TF/s of the causal attention)")
        # llama gets the full grid; mistral what is left
        deadline = t_end if i else time.monotonic() + 0.7 * (t_end - time.monotonic())
        res[name] = prefill_model(name, shape, args, device, clock, deadline, cands)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attn-sweep-<dev>-<time>.json)")
    p.add_argument("--budget-s", type=float, default=180.0,
                   help="seconds of measuring after setup (compiles included); setup and the last rows add ~20 s")
    p.add_argument("--decode-share", type=float, default=0.6, help="share of the budget for decode")
    p.add_argument("--target-ms", type=float, default=12.0, help="GPU time per measurement")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    args = p.parse_args()
    device = torch.device("cpu" if SMOKE else "cuda")
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("attn_sweep needs a CUDA device (or --smoke for a CPU run of tiny shapes)")
    if SMOKE:
        args.batches, args.contexts = [1, 2], [32, 64]
        args.chunks, args.offsets, args.recompute = [16, 32], [0, 32], 64
        args.target_ms = 1.0
    else:
        args.batches, args.contexts = [1, 2, 4, 8, 16, 32, 64], [1024, 4096, 16384]
        args.chunks, args.offsets, args.recompute = [512, 1024, 2048], [0, 4096, 12288], 16384
    torch.manual_seed(0)
    budget = Budget(args.budget_s)
    clock = Clock(device, args.target_ms)
    import triton
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
           "sms": tp._sm_count(device), "torch": torch.__version__, "triton": triton.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
           "pool": f"[blocks, {LAYERS} layers, 2, {PAGE}, kv_heads, D] fp16, blocks scattered at random"}
    hbm = copy_gbps(device, clock)
    log(f"{env['device']}, {env['sms']} SMs, torch {env['torch']}, triton {env['triton']}")
    log(f"HBM: {hbm:.0f} GB/s (1 GiB device copy, bytes read + written)")
    log("decode: us per call in a CUDA graph (calls read different sequences: more K/V than L2); % = K+V "
        "bytes read / time, of the HBM copy rate; 'current' = the launch triton_paged picks today, 'best' = "
        "fastest measured at that context, 'table' = the one config per batch the table should hold")
    decode = decode_section(args, device, clock, hbm, budget, args.budget_s * args.decode_share)
    log(f"(decode done at {budget.now():.0f} s)")
    table = decode_table_text(decode)
    prefill = prefill_section(args, device, clock, budget, max(5.0, budget.left()))
    log(f"(prefill done at {budget.now():.0f} s)")
    rec_best = {n: m["recompute"]["best"] for n, m in prefill.items()}
    pc = rec_best.get("llama2-7b")
    log("\n== paste into src/djinn/attention/triton_paged.py (from this run)\n" + table)
    if pc:
        c = pc["config"]
        log(f"PREFILL_CONFIG = PrefillConfig(block_m={c['block_m']}, block_n={c['block_n']}, "
            f"num_warps={c['num_warps']}, num_stages={c['num_stages']})")
        log(f"# prefill chunk size with it: {pc['chunk']} tokens ({pc['ms']:.2f} ms per layer for a "
            f"{args.recompute}-token recompute; SDPA causal: "
            f"{prefill['llama2-7b']['recompute']['sdpa_causal_ms']:.2f} ms)")
    result = {"env": env, "hbm_copy_gbps": hbm, "decode": decode, "decode_table": table, "prefill": prefill,
              "prefill_config": pc["config"] if pc else None, "prefill_chunk": pc["chunk"] if pc else None,
              "elapsed_s": budget.now()}
    out = args.out or (f"benchmarks/results/attn-sweep-{device.type}-"
                       f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1, default=str))
    log(f"\nwrote {out} ({budget.now():.0f} s)")


if __name__ == "__main__":
    main()
