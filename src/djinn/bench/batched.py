"""Batched decoding for ``djinn bench decode``: Djinn's packed batches (CUDA graphs on) against
transformers' own ``generate`` at the same batch, the paged kernel alone, and the roofline.

Contexts are filled with random K/V instead of a prefill: a decode step costs the same
whatever the values are, and the prefill of 64 x 2,048 tokens would cost more bench time
than all the decode steps together. transformers gets the same treatment: its
``DynamicCache`` is filled with random K/V of the context length and ``generate`` continues
from it (the time of ``generate(n)`` minus ``generate(1)``, over ``n - 1``, is its decode step).

Roofline of a step = (weight bytes + the batch's K/V bytes) / the device-to-device copy
bandwidth measured in the same run (bytes read + written per second), the fastest a step
that must read every weight and every context token once can be.
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

from djinn.bench.common import median, sync


def _free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 62
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Bytes read + written per second by a big device-to-device copy."""
    if device.type != "cuda":
        nbytes, iters = 64 << 20, 5
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    bw = 2 * nbytes * iters / (time.perf_counter() - t)
    del src, dst
    return bw


def _cuda_time_us(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def kernel_bench(device: torch.device, batches=(1, 8, 32, 64), context: int = 1024, heads: int = 32,
                 dim: int = 128, block_size: int = 16, log=print) -> list[dict]:
    """One decode layer: the paged kernel vs SDPA on contiguous K/V vs gather + SDPA."""
    from djinn.attention.triton_paged import choose_splits, paged_decode

    dtype = torch.float16
    scale = dim ** -0.5
    out = []
    for b in batches:
        per = context // block_size
        nb = b * per + 1
        pool = torch.randn(nb, 1, 2, block_size, heads, dim, device=device, dtype=dtype)
        kc, vc = pool[:, 0, 0], pool[:, 0, 1]
        tables = (torch.randperm(nb - 1, device=device)[: b * per] + 1).to(torch.int32).view(b, per)
        seq = torch.arange(b, dtype=torch.int32, device=device)
        lens = torch.full((b,), context, dtype=torch.int32, device=device)
        q = torch.randn(b, heads, dim, device=device, dtype=dtype)
        kf = torch.randn(b, heads, context, dim, device=device, dtype=dtype)
        vf = torch.randn_like(kf)
        q4 = q[:, :, None]

        def paged():
            paged_decode(q, kc, vc, tables, seq, lens, scale)

        def contiguous():
            F.scaled_dot_product_attention(q4, kf, vf, scale=scale)

        def gathered():
            idx = tables.long()
            k = kc[idx].flatten(1, 2).transpose(1, 2)
            v = vc[idx].flatten(1, 2).transpose(1, 2)
            F.scaled_dot_product_attention(q4, k, v, scale=scale)

        row = {"batch": b, "context": context, "heads": heads, "head_dim": dim, "dtype": "float16",
               "splits": choose_splits(b, heads, device),
               "paged_kernel_us": _cuda_time_us(paged), "sdpa_contiguous_us": _cuda_time_us(contiguous),
               "gather_sdpa_us": _cuda_time_us(gathered)}
        kv_bytes = 2 * b * context * heads * dim * 2
        row["paged_kernel_gbps"] = kv_bytes / row["paged_kernel_us"] / 1e3
        out.append(row)
        log(f"  kernel b{b:>2} ctx {context}: paged {row['paged_kernel_us']:.0f} us, SDPA contiguous "
            f"{row['sdpa_contiguous_us']:.0f} us, gather+SDPA {row['gather_sdpa_us']:.0f} us "
            f"({row['paged_kernel_gbps']:.0f} GB/s, {row['splits']} splits)")
        del pool, kc, vc, kf, vf
    return out


def djinn_batched(executor, pool, graphs, batches, contexts, steps: int, log=print, eager_for=()) -> list[dict]:
    """ms per decode step through ``Executor.forward_batch`` for each (batch, context)."""
    from djinn.engine.batch import BatchItem

    device = pool.device
    bs = pool.shape.block_size
    out = []
    for ctx in contexts:
        for b in batches:
            per_seq = -(-(ctx + steps + 8) // bs)
            if b * per_seq > pool.free_count:
                out.append({"batch": b, "context": ctx, "skipped": f"needs {b * per_seq} KV blocks, pool has "
                            f"{pool.free_count} ({pool.shape.block_bytes / 2**20:.0f} MiB each)"})
                log(f"  djinn b{b} ctx {ctx}: skipped ({out[-1]['skipped']})")
                continue
            tables = [pool.allocate(per_seq) for _ in range(b)]
            try:
                row = {"batch": b, "context": ctx}
                for mode in (("graphs", "eager") if (b, ctx) in eager_for else ("graphs",)):
                    use = graphs if mode == "graphs" else None
                    starts = [ctx] * b
                    toks = [7] * b
                    n = steps if mode == "graphs" else max(3, steps // 4)
                    for i in range(3 + n):
                        if i == 3:
                            sync(device)
                            t = time.perf_counter()
                        items = [BatchItem(tb, s, [k]) for tb, s, k in zip(tables, starts, toks)]
                        logits = executor.forward_batch(pool, items, graphs=use)
                        toks = torch.cat([lg[-1:] for lg in logits]).argmax(-1).tolist()
                        starts = [s + 1 for s in starts]
                    sync(device)
                    row[f"djinn_{mode}_ms_per_step"] = (time.perf_counter() - t) / n * 1e3
                row["djinn_ms_per_step"] = row["djinn_graphs_ms_per_step"]
                row["djinn_tokens_per_s"] = b * 1e3 / row["djinn_ms_per_step"]
                row["graph_used"] = graphs is not None and graphs.bucket_for(b) is not None
                out.append(row)
                extra = f", eager {row['djinn_eager_ms_per_step']:.2f}" if "djinn_eager_ms_per_step" in row else ""
                log(f"  djinn b{b:>2} ctx {ctx}: {row['djinn_ms_per_step']:.2f} ms/step "
                    f"({row['djinn_tokens_per_s']:.0f} tok/s){extra}")
            finally:
                for tb in tables:
                    pool.release(tb)
    return out


def _random_cache(model, batch: int, ctx: int, device, dtype):
    from transformers import DynamicCache

    from djinn.engine.runtime import kv_geometry

    kv = kv_geometry(model.config, 16, dtype)
    cache = DynamicCache(config=model.config)
    for layer in range(kv.num_layers):
        k = torch.randn(batch, kv.kv_heads, ctx, kv.head_dim, device=device, dtype=dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def transformers_batched(model, batches, contexts, steps: int, repeat: int, kv_token_bytes: int, log=print
                         ) -> dict[tuple[int, int], dict]:
    """transformers' ``generate`` continuing from a random ``DynamicCache`` of ``ctx`` tokens."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = {}
    for ctx in contexts:
        for b in batches:
            need = b * ctx * kv_token_bytes * 1.15 + (2 << 30)
            if device.type == "cuda" and need > _free_bytes(device):
                out[(b, ctx)] = {"skipped": f"needs ~{need / 2**30:.1f} GiB free for its DynamicCache"}
                log(f"  transformers b{b} ctx {ctx}: skipped ({out[(b, ctx)]['skipped']})")
                continue
            cache = _random_cache(model, b, ctx, device, dtype)
            ids = torch.randint(3, model.config.vocab_size, (b, ctx + 1), device=device)
            mask = torch.ones_like(ids)

            def gen(n: int):
                model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
                cache.crop(ctx - cache.get_seq_length())    # back to the context for the next run

            times = {1: [], steps: []}
            gen(2)
            for _ in range(repeat):
                for n in (1, steps):
                    sync(device)
                    t = time.perf_counter()
                    gen(n)
                    sync(device)
                    times[n].append(time.perf_counter() - t)
            step = (median(times[steps]) - median(times[1])) / (steps - 1) * 1e3
            out[(b, ctx)] = {"transformers_ms_per_step": step, "transformers_tokens_per_s": b * 1e3 / step}
            log(f"  transformers b{b:>2} ctx {ctx}: {step:.2f} ms/step ({b * 1e3 / step:.0f} tok/s)")
            del cache
            _free_bytes(device)
    return out


def roofline_ms(weight_bytes: int, kv_token_bytes: int, batch: int, context: int, bandwidth: float) -> float:
    return (weight_bytes + batch * context * kv_token_bytes) / bandwidth * 1e3


def merge(djinn_rows: list[dict], hf: dict, weight_bytes: int, kv_token_bytes: int, bandwidth: float) -> list[dict]:
    rows = []
    for r in djinn_rows:
        r = dict(r)
        b, ctx = r["batch"], r["context"]
        r["roofline_ms"] = roofline_ms(weight_bytes, kv_token_bytes, b, ctx, bandwidth)
        if "djinn_ms_per_step" in r:
            r["fraction_of_roofline"] = r["roofline_ms"] / r["djinn_ms_per_step"]
        h = hf.get((b, ctx), {})
        r.update({k if k != "skipped" else "transformers_skipped": v for k, v in h.items()})
        if "djinn_ms_per_step" in r and "transformers_ms_per_step" in r:
            r["speedup_vs_transformers"] = r["transformers_ms_per_step"] / r["djinn_ms_per_step"]
        rows.append(r)
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's targets, read off the rows (None where a row is missing)."""
    def find(b, ctx):
        return next((r for r in rows if r["batch"] == b and r["context"] == ctx and "djinn_ms_per_step" in r), None)

    b1 = [r for r in rows if r["batch"] == 1 and "djinn_ms_per_step" in r]
    r32 = find(32, 1024)
    res = {"batch1_max_ms_per_token": 7.0,
           "batch1_ms_per_token": {r["context"]: r["djinn_ms_per_step"] for r in b1},
           "batch1_ok": bool(b1) and all(r["djinn_ms_per_step"] <= 7.0 for r in b1 if r["context"] <= 1024)}
    if r32 is not None:
        res["batch32_ctx1024_fraction_of_roofline"] = r32.get("fraction_of_roofline")
        res["batch32_ctx1024_speedup_vs_transformers"] = r32.get("speedup_vs_transformers")
        res["batch32_ok"] = (r32.get("fraction_of_roofline", 0) >= 0.6
                             and r32.get("speedup_vs_transformers", 0) >= 3.0)
    return res


def fill_random(pool, chunk_blocks: int = 256) -> None:
    """Random K/V in every block (chunked: no pool-sized temporary)."""
    for a in range(0, pool.num_blocks, chunk_blocks):
        pool.kv[a:a + chunk_blocks].normal_(0.0, 1.0)


def pool_blocks_for(batches, contexts, steps: int, block_size: int, block_bytes: int, device) -> int:
    """Blocks for the largest (batch, context) that fits in free memory (reserve 3 GiB)."""
    want = max(b * -(-(c + steps + 8) // block_size) for b in batches for c in contexts) + 1
    fit = (_free_bytes(device) - (3 << 30)) // block_bytes if device.type == "cuda" else want
    return int(max(2, min(want, fit)))


__all__ = ["copy_bandwidth", "kernel_bench", "djinn_batched", "transformers_batched", "merge", "targets",
           "fill_random", "pool_blocks_for", "roofline_ms"]
