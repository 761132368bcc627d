"""``djinn bench fork``: N forks of one long session, sharing its KV copy-on-write.

One session holds a 2,000-token history (``--prefix`` prompt tokens and one generated; Llama-2-7B shape);
``--forks`` forks of it each take one different token and generate ``--new`` greedy tokens.
Recorded:

- bytes, from the block pool's own accounting: device KV held after all forks generated,
  against one copy of the prefix plus every fork's tail (the claim), and against what
  independent sessions would hold (the sum of reference counts);
- fork latency (median ms per ``fork()``; it shares block ids and copies no KV);
- tokens: each fork's against an independent session given the same history (computed from
  scratch, no sharing), as the fraction of forks whose tokens are identical (reported; fp16
  kernels of different shapes may break near-ties, so it is not asserted here — the CPU
  tests assert equality with transformers in float32).

``--quick``: tiny-llama on the CPU, a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from djinn.bench.common import record, sync, write


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench fork", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prefix", type=int, default=1999,
                   help="prompt tokens; with the one token generated the history is prefix + 1 tokens (default "
                        "2,000), and the last KV block is partly filled, so each fork's first turn copies it")
    p.add_argument("--forks", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--check", type=int, default=None, help="forks compared with independent sessions (default all)")
    p.add_argument("--quick", action="store_true", help="tiny-llama on the CPU: a smoke run")
    p.add_argument("--out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.model, args.device, args.prefix, args.forks, args.new = "tiny-llama", "cpu", 395, 8, 16
    from djinn.config import EngineConfig, MemoryConfig, default_home
    from djinn.engine import Engine, GenerateRequest, SamplingParams
    from djinn.engine.startup import resolve_device, resolve_dtype
    from djinn.models import load_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"loading {args.model} ({dtype}) on {device} ...", flush=True)
    lm = load_model(args.model, device=device, dtype=dtype, home=default_home())
    bs = 16
    per_fork = -(-(args.new + 2) // bs) + 1
    blocks = 2 * (-(-(args.prefix + 1) // bs)) + args.forks * per_fork + 16   # room for the independent checks
    # prefix sharing off: this measures fork's own sharing, and the independent sessions then
    # compute every block themselves, as a session that never met the parent would (with it on,
    # they would take the parent's blocks, and the forks' identical completed blocks would merge)
    eng = Engine({"m": lm}, EngineConfig(prefix_sharing=False, memory=MemoryConfig(block_size=bs, kv_blocks=blocks)))
    pool = eng.runtimes["m"].pool
    greedy = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    vocab = min(lm.config.vocab_size, 30000)
    ids = torch.randint(5, vocab, (args.prefix,), generator=gen).tolist()
    tails = torch.randint(5, vocab, (args.forks,), generator=gen).tolist()
    try:
        parent = eng.open_session("m")
        t = time.perf_counter()
        eng.generate(parent, GenerateRequest(ids, SamplingParams(max_new_tokens=1, ignore_eos=True)))
        print(f"prefix of {args.prefix} tokens in {time.perf_counter() - t:.2f} s", flush=True)
        history = list(eng.sessions[parent].tokens)
        cached = eng.sessions[parent].num_cached
        before = pool.used_count
        fork_ms, children = [], []
        for _ in tails:
            sync(device)
            t = time.perf_counter()
            children.append(eng.fork(parent)["session_id"])
            sync(device)
            fork_ms.append((time.perf_counter() - t) * 1e3)
        after_fork = pool.used_count
        outs = []
        t = time.perf_counter()
        for i, (c, tok) in enumerate(zip(children, tails)):
            outs.append(eng.generate(c, GenerateRequest([tok], greedy)).token_ids)
            print(f"fork {i + 1}/{args.forks}: {args.new} tokens", flush=True)
        gen_s = time.perf_counter() - t
        bb = pool.shape.block_bytes
        used = pool.used_count
        expected = pool.shape.blocks_for(cached) + sum(
            pool.shape.blocks_for(eng.sessions[c].num_cached) - cached // bs for c in children)
        sharing = eng.stats()["sharing"]
        check = args.forks if args.check is None else min(args.check, args.forks)
        same = 0
        for c, tok, out in zip(children[:check], tails, outs):
            eng.close_session(c)                   # room for the independent session
            # the same turns as the fork's history (the prefix turn, then the tail), so the same
            # kernels compute the same values: on CUDA in half precision a one-shot prefill of
            # history + [tok] rounds differently and breaks near-ties of random weights
            s = eng.open_session("m")
            first = eng.generate(s, GenerateRequest(ids, SamplingParams(max_new_tokens=1, ignore_eos=True)))
            assert ids + first.token_ids == history, "the independent session's first turn differs from the parent's"
            ref = eng.generate(s, GenerateRequest([tok], greedy)).token_ids
            same += ref == out
            eng.close_session(s)
            print(f"independent check: {same} identical so far", flush=True)
        results = {
            "block_bytes": bb, "prefix_tokens": cached, "blocks_before_forks": before,
            "blocks_after_forks": after_fork, "kv_device_bytes": used * bb,
            "kv_expected_bytes_prefix_plus_tails": expected * bb,
            "kv_matches_prefix_plus_tails": used == expected,
            "kv_unshared_equivalent_bytes": sharing["kv_unshared_equivalent"],
            "kv_shared_bytes": sharing["kv_shared"], "sharing_ratio": sharing["sharing_ratio"],
            "cow_copies": sharing["cow_copies"],
            "fork_ms_median": statistics.median(fork_ms), "fork_ms_max": max(fork_ms),
            "generate_s_all_forks": gen_s,
            "forks_identical_to_independent": f"{same}/{check}",
        }
    finally:
        eng.shutdown()
    for k, v in results.items():
        print(f"{k}: {v}")
    params = {"model": args.model, "dtype": str(dtype), "prefix": args.prefix, "forks": args.forks, "new": args.new,
              "prefix_sharing": False}
    write(record("fork", device, params, results), args.out)
    return 0
