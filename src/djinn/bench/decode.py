"""``djinn bench decode``: greedy decoding speed against transformers' ``generate`` on the same
weights, in the same run.

Batch 1: a ``--prompt``-token prompt, ``--new`` new tokens, time to first token and ms per
decode step for Djinn's engine and for ``model.generate``; the ratio is the result, and the
tokens of both are compared.

Batched (djinn.bench.batched): ms per step and tokens/s of Djinn's packed batches (CUDA
graphs on) at ``--batches`` x ``--contexts``, transformers' ``generate`` at the same batch,
the paged attention kernel alone against SDPA, and each step's roofline from the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from djinn.bench.common import median, record, sync, timed, write
from djinn.client.embedded import resolve_device, resolve_dtype
from djinn.config import EngineConfig, MemoryConfig, default_home
from djinn.engine import Engine, GenerateRequest, SamplingParams


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench decode", description=__doc__)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batches", default="1,8,32,64", help="batch sizes of the batched decode part")
    p.add_argument("--contexts", default="512,1024,2048", help="context lengths of the batched decode part")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batched configuration")
    p.add_argument("--hf-steps", type=int, default=8, help="new tokens per timed transformers generate")
    p.add_argument("--skip", default="", help="comma list of parts to skip: batch1,kernel,djinn,transformers")
    p.add_argument("--quick", action="store_true", help="tiny-llama, short prompt: a smoke run for CPUs")
    p.add_argument("--out", default=None)
    return p


def run_batch1(engine: Engine, name: str, model, prompt: list[int], new: int, repeat: int,
               device: torch.device) -> dict:
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def hf(n: int):
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()

    def djinn():
        sid = engine.open_session(name)
        try:
            return engine.generate(sid, GenerateRequest(list(prompt), params))
        finally:
            engine.close_session(sid)

    hf_ttft, _ = timed(lambda: hf(1), device, repeat)
    hf_total, hf_tokens = timed(lambda: hf(new), device, repeat)
    dj_total, dj_out = timed(djinn, device, repeat)
    dj_ttft, _ = timed(lambda: engine.generate(engine.open_session(name), GenerateRequest(list(prompt), SamplingParams(
        max_new_tokens=1, ignore_eos=True))), device, repeat)
    sync(device)
    hf_step = (median(hf_total) - median(hf_ttft)) / (new - 1) * 1e3
    dj_step = (median(dj_total) - median(dj_ttft)) / (new - 1) * 1e3
    same = sum(a == b for a, b in zip(hf_tokens, dj_out.token_ids))
    return {
        "batch": 1, "prompt_tokens": len(prompt), "new_tokens": new,
        "transformers_total_s": hf_total, "djinn_total_s": dj_total,
        "transformers_ttft_ms": median(hf_ttft) * 1e3, "djinn_ttft_ms": median(dj_ttft) * 1e3,
        "transformers_ms_per_token": hf_step, "djinn_ms_per_token": dj_step,
        "ratio_total_djinn_over_transformers": median(dj_total) / median(hf_total),
        "ratio_step_djinn_over_transformers": dj_step / hf_step,
        "tokens_equal": same, "tokens_compared": new,
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run_batched(args, lm, device, log) -> dict:
    from djinn.bench import batched as bb
    from djinn.engine.executor import Executor
    from djinn.engine.graphs import StepGraphs
    from djinn.engine.runtime import kv_geometry
    from djinn.memory.blocks import BlockPool
    from djinn.models.adapter import locate

    skip = set(args.skip.split(","))
    batches, contexts = _ints(args.batches), _ints(args.contexts)
    kv = kv_geometry(lm.config, 16, lm.dtype)
    weights = lm.weight_bytes()
    out: dict = {"weight_bytes": weights, "kv_bytes_per_token": kv.token_bytes}
    out["copy_bandwidth_gbps"] = bw = bb.copy_bandwidth(device) / 1e9
    log(f"device-to-device copy: {bw:.0f} GB/s (read + write)")
    if device.type == "cuda" and "kernel" not in skip:
        log("paged attention kernel, one layer:")
        out["kernel"] = bb.kernel_bench(device, log=log)
    rows: list[dict] = []
    if "djinn" not in skip:
        ex = Executor(lm.model, locate(lm.model))
        blocks = bb.pool_blocks_for(batches, contexts, args.steps, 16, kv.block_bytes, device)
        pool = BlockPool(kv, blocks, device)
        bb.fill_random(pool)
        log(f"KV pool: {blocks} blocks of {kv.block_bytes / 2**20:.1f} MiB")
        graphs = None
        if device.type == "cuda":
            t = time.perf_counter()
            graphs = StepGraphs(ex, pool, max_context=max(contexts) + args.steps + 16,
                                buckets=tuple(sorted(set(batches))), max_seqs=max(batches))
            graphs.capture()
            out["graph_capture_s"] = time.perf_counter() - t
            log(f"captured decode graphs for batches {graphs.captured} in {out['graph_capture_s']:.1f} s")
        eager_for = {(1, 1024), (32, 1024)} if device.type == "cuda" else set()
        rows = bb.djinn_batched(ex, pool, graphs, batches, contexts, args.steps, log=log, eager_for=eager_for)
        if device.type == "cuda":
            # what the fused norm/rotary kernels are worth: the same steps captured without them
            from djinn.engine import fused

            del graphs
            fused.ENABLED = False
            try:
                plain = StepGraphs(ex, pool, max_context=max(contexts) + args.steps + 16, buckets=(1, 32),
                                   max_seqs=32)
                plain.capture()
                log("without fused norm/rotary kernels:")
                out["unfused"] = bb.djinn_batched(ex, pool, plain, [1, 32], [1024], args.steps, log=log)
                del plain
            finally:
                fused.ENABLED = True
            graphs = None
        del graphs, pool, ex
    hf = {}
    if "transformers" not in skip:
        hf = bb.transformers_batched(lm.model, batches, contexts, args.hf_steps, 2, kv.token_bytes, log=log)
    out["rows"] = bb.merge(rows, hf, weights, kv.token_bytes, bw * 1e9)
    out["targets"] = bb.targets(out["rows"])
    for r in out["rows"]:
        if "djinn_ms_per_step" in r:
            log(f"b{r['batch']:>2} ctx {r['context']:>4}: Djinn {r['djinn_ms_per_step']:.2f} ms/step, roofline "
                f"{r['roofline_ms']:.2f} ms ({r['fraction_of_roofline']:.2f}x), transformers "
                f"{r.get('transformers_ms_per_step', float('nan')):.2f} ms "
                f"({r.get('speedup_vs_transformers', float('nan')):.2f}x faster)")
    log(f"targets: {out['targets']}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.model, args.prompt, args.new = "tiny-llama", 64, 32
        args.batches, args.contexts, args.steps, args.hf_steps = "1,4", "64,128", 8, 4
    from djinn.models import load_model

    def log(msg: str) -> None:
        print(msg, flush=True)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    lm = load_model(args.model, device=device, dtype=dtype, home=default_home())
    log(f"loaded {args.model} ({dtype}) on {device} in {time.perf_counter() - t0:.0f} s")
    results: dict = {}
    if "batch1" not in args.skip.split(","):
        blocks = -(-(args.prompt + args.new) // 16) * 4 + 8
        engine = Engine({args.model: lm}, EngineConfig(memory=MemoryConfig(kv_blocks=blocks)))
        try:
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(3, lm.config.vocab_size, (args.prompt,), generator=gen).tolist()
            res = run_batch1(engine, args.model, lm.model, prompt, args.new, args.repeat, device)
        finally:
            engine.shutdown()
        log(f"{args.model} {dtype} batch 1, prompt {args.prompt}, {args.new} new: "
            f"transformers {res['transformers_ms_per_token']:.2f} ms/token, Djinn {res['djinn_ms_per_token']:.2f} "
            f"ms/token (total ratio {res['ratio_total_djinn_over_transformers']:.3f}); TTFT "
            f"{res['transformers_ttft_ms']:.1f} vs {res['djinn_ttft_ms']:.1f} ms; tokens equal "
            f"{res['tokens_equal']}/{res['tokens_compared']}")
        results["batch1"] = res
    results["batched"] = run_batched(args, lm, device, log)
    results["wall_s"] = time.perf_counter() - t0
    write(record("decode", device, vars(args), results), args.out)
    return 0
