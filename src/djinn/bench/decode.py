"""``djinn bench decode``: greedy decoding speed against transformers' ``generate`` on the same
weights, in the same run.

Batch 1: a ``--prompt``-token prompt, ``--new`` new tokens, time to first token and ms per
decode step for Djinn's engine and for ``model.generate``; the ratio is the result, and the
tokens of both are compared.
"""

from __future__ import annotations

import argparse

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.model, args.prompt, args.new = "tiny-llama", 64, 32
    from djinn.models import load_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    lm = load_model(args.model, device=device, dtype=dtype, home=default_home())
    blocks = -(-(args.prompt + args.new) // 16) * 4 + 8
    engine = Engine({args.model: lm}, EngineConfig(memory=MemoryConfig(kv_blocks=blocks)))
    try:
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, lm.config.vocab_size, (args.prompt,), generator=gen).tolist()
        res = run_batch1(engine, args.model, lm.model, prompt, args.new, args.repeat, device)
    finally:
        engine.shutdown()
    print(f"{args.model} {dtype} batch 1, prompt {args.prompt}, {args.new} new: "
          f"transformers {res['transformers_ms_per_token']:.2f} ms/token, Djinn {res['djinn_ms_per_token']:.2f} ms/token "
          f"(total ratio {res['ratio_total_djinn_over_transformers']:.3f}); TTFT {res['transformers_ttft_ms']:.1f} vs "
          f"{res['djinn_ttft_ms']:.1f} ms; tokens equal {res['tokens_equal']}/{res['tokens_compared']}")
    write(record("decode", device, vars(args), {"batch1": res}), args.out)
    return 0
