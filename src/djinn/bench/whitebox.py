"""``djinn bench whitebox``: breakpoints on a real model shape, through the client API.

For each breakpoint layer (default 1, 8, 16, 24, 31 of the Llama-2-7B shape, 512-token prompt):

- token accuracy: greedy continuation (``--new`` tokens) after pausing at that layer of the
  prefill and resuming unchanged, after resuming with the fetched activation sent back, and
  after pausing at a decode step, each against a plain generation of the same prompt (the
  reference). ``exact`` is the share of positions equal to the reference. A divergence is judged
  by the reference's logits as ``bench soak`` judges one: the plain path's forward over the
  resumed run's own tokens gives, at each step, the gap between its best logit and the logit
  of the token the run chose; a run whose every gap is within the tie tolerance is a
  ``near_tie`` (greedy up to rounding: a differing token where the reference's top-2 gap is
  below rounding), otherwise ``wrong``. ``tie_adjusted`` is the share of the run's tokens
  within the tolerance. The tolerance is ``--tie-tolerance``, or ``TIE_FACTOR`` (soak's) times
  the rounding measured here between two correct computations of the same logits (one forward
  over prompt + reference, and the reference's tokens over the cached prompt), at least soak's
  ``TIE_TOLERANCE``;
- overhead (median of ``--repeat`` interleaved rounds after one warm-up round, each side timed
  as one interval, no transfer): ``overhead_pct``, like with like, is ``forward(prompt,
  breakpoint=L)`` + ``resume()`` against a plain ``forward(prompt)``: the same work (every row's
  logits) on the same kernels, the pause the only difference (target <= 5%).
  ``generate_overhead_pct`` is a one-token ``generate`` paused after the layer and resumed
  against a plain one-token ``generate``: the cost a user sees against the plain path, which
  also counts the paused step running eagerly where the plain step may replay a CUDA graph;
- round trip: ``p.activation.fetch()`` (the [512, 4096] hidden state to the client) and
  ``p.resume(h)`` (sent back), against ``p.resume()``.

Embedded client by default; ``--address HOST:PORT`` runs the same calls against a server
(``djinn.connect(address)``), which then owns the model and its device.
"""

from __future__ import annotations

import argparse
import time

import torch

from djinn.bench.common import median, record, sync, write
from djinn.bench.soak import TIE_FACTOR, TIE_TOLERANCE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench whitebox", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=32, help="greedy tokens compared for accuracy")
    p.add_argument("--layers", default="1,8,16,24,31", help="breakpoint layers, comma-separated")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--address", default=None, help="HOST:PORT of a djinn server (default: embedded)")
    p.add_argument("--token", default=None)
    p.add_argument("--tie-tolerance", type=float, default=None,
                   help="logit gap within which a divergence from the reference is a near-tie (default: "
                        f"{TIE_FACTOR:g}x the measured rounding, at least {TIE_TOLERANCE:g})")
    p.add_argument("--quick", action="store_true", help="tiny-llama on the CPU: a smoke run")
    p.add_argument("--out", default=None)
    return p


def _client(args):
    """A client, the device timings refer to, and (embedded only) transformers' module."""
    import djinn
    from djinn.client.embedded import EmbeddedBackend, resolve_device, resolve_dtype
    from djinn.config import Config, EngineConfig, MemoryConfig, default_home
    from djinn.engine import Engine
    from djinn.models import load_model

    if args.address:
        return djinn.connect(args.address, token=args.token), torch.device("cpu"), None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"loading {args.model} ({dtype}) on {device} ...", flush=True)
    t = time.perf_counter()
    lm = load_model(args.model, device=device, dtype=dtype, home=default_home())
    print(f"loaded in {time.perf_counter() - t:.1f} s", flush=True)
    blocks = 3 * -(-(args.prompt + args.new) // 16) + 8     # a few sessions of prompt + new tokens
    config = Config(engine=EngineConfig(device=str(device), dtype=args.dtype, memory=MemoryConfig(kv_blocks=blocks)))
    engine = Engine({args.model: lm}, config.engine)
    return djinn.Client(EmbeddedBackend(config, engine=engine)), device, lm.model


def _ms(fn, device, out: list[float]):
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    out.append((time.perf_counter() - t) * 1e3)
    return result


def overhead(m, prompt: list[int], layer: int, repeat: int, device) -> dict:
    """Plain vs paused-after-``layer`` and resumed, for a ``forward`` (the headline: like with
    like) and a one-token ``generate``; the activation round trip (fetch, resume with it) vs
    ``resume()``.
    Interleaved rounds; the first warms up and is dropped."""
    gen_plain, gen_paused, fwd_plain, fwd_paused, resume, fetch, resume_sent = [], [], [], [], [], [], []

    def paused_generate(s):
        return s.generate(prompt, max_new_tokens=1, ignore_eos=True, breakpoint=(layer, 0)).resume()

    for i in range(repeat + 1):
        with m.session() as s:
            _ms(lambda: s.generate(prompt, max_new_tokens=1, ignore_eos=True), device, gen_plain)
        with m.session() as s:
            _ms(lambda: paused_generate(s), device, gen_paused)
        with m.session() as s:
            _ms(lambda: s.forward(prompt), device, fwd_plain)
        with m.session() as s:
            _ms(lambda: s.forward(prompt, breakpoint=layer).resume(), device, fwd_paused)
        with m.session() as s:
            p = s.forward(prompt, breakpoint=layer)
            sync(device)
            _ms(p.resume, device, resume)
        with m.session() as s:
            p = s.forward(prompt, breakpoint=layer)
            sync(device)
            h = _ms(p.activation.fetch, device, fetch)
            _ms(lambda: p.resume(h), device, resume_sent)
        if i == 0:
            for xs in (gen_plain, gen_paused, fwd_plain, fwd_paused, resume, fetch, resume_sent):
                xs.clear()
    return {
        "plain_forward_ms": median(fwd_plain), "pause_plus_resume_ms": median(fwd_paused),
        "overhead_pct": (median(fwd_paused) / median(fwd_plain) - 1) * 100,
        "plain_generate_ms": median(gen_plain), "paused_generate_ms": median(gen_paused),
        "generate_overhead_pct": (median(gen_paused) / median(gen_plain) - 1) * 100,
        "resume_ms": median(resume), "fetch_ms": median(fetch),
        "resume_with_sent_activation_ms": median(resume_sent),
        "round_trip_extra_ms": median(fetch) + median(resume_sent) - median(resume),
        "activation_shape": list(h.shape), "activation_bytes": h.numel() * h.element_size(),
        "samples": {"plain_generate": gen_plain, "paused_generate": gen_paused, "plain_forward": fwd_plain,
                    "pause_plus_resume": fwd_paused, "fetch": fetch, "resume_sent": resume_sent},
    }


def rounding(m, prompt: list[int], reference: list[int]) -> float:
    """The largest difference between two correct computations of the same logits here: the
    reference's tokens in one forward with the prompt, and over the cached prompt."""
    if len(reference) < 2:
        return 0.0
    n = len(prompt)
    with m.session() as s:
        one = s.forward(prompt + reference[:-1]).logits[n:].fetch()
    with m.session() as s:
        s.forward(prompt)
        two = s.forward(reference[:-1]).logits.fetch()
    return float((one.float() - two.float()).abs().max())


def verdict(got: list[int], reference: list[int], logits: torch.Tensor | None, tolerance: float) -> dict:
    """``got`` judged against ``reference``. ``logits``: the reference model's logits predicting
    each of ``got`` from the run's own history (row k: after prompt + got[:k]); needed only
    when they differ. A run whose tokens are each within ``tolerance`` of the best logit is
    greedy up to rounding: a ``near_tie``, not an error."""
    n = len(reference)
    exact = sum(a == b for a, b in zip(got, reference)) / n
    k = next((i for i, (a, b) in enumerate(zip(got, reference)) if a != b), None)
    if k is None and len(got) == n:
        return {"exact": exact, "tie_adjusted": 1.0, "verdict": "equal", "diverges_at": None}
    logits = logits.float()
    rows = torch.arange(len(got))
    gaps = logits.max(-1).values - logits[rows, torch.tensor(got)]
    within = gaps <= tolerance
    out = {"exact": exact, "tie_adjusted": float(within.sum()) / n, "diverges_at": k,
           "max_gap": float(gaps.max()), "gaps": [float(g) for g in gaps]}
    if k is not None:
        top2 = logits[k].topk(2).values
        out["top2_gap_at_divergence"] = float(top2[0] - top2[1])
        out["reference_minus_got_at_divergence"] = float(logits[k, reference[k]] - logits[k, got[k]])
    out["verdict"] = "near_tie" if len(got) == n and bool(within.all()) else "wrong"
    return out


def judged(m, prompt: list[int], got: list[int], reference: list[int], tolerance: float) -> dict:
    logits = None
    if got != reference:   # the plain path's logits over the run's own history
        with m.session() as s:
            logits = s.forward(prompt + got[:-1]).logits[len(prompt) - 1:].fetch()
    return verdict(got, reference, logits, tolerance)


def accuracy(m, prompt: list[int], layer: int, new: int, reference: list[int], tolerance: float) -> dict:
    out = {}
    for label, step, send_back in (("prefill_resume", 0, False), ("prefill_round_trip", 0, True),
                                   ("decode_resume", new // 2, False)):
        with m.session() as s:
            p = s.generate(prompt, max_new_tokens=new, ignore_eos=True, breakpoint=(layer, step))
            tokens = (p.resume(p.activation.fetch()) if send_back else p.resume()).token_ids
        out[label] = judged(m, prompt, tokens, reference, tolerance)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.model, args.prompt, args.new, args.layers, args.repeat = "tiny-llama", 64, 8, "0,1,2", 2
        args.device = "cpu" if args.device == "auto" else args.device
    client, device, hf = _client(args)
    try:
        m = client.model(args.model)
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
        bad = [x for x in layers if not 0 <= x < m.num_layers]
        if bad:
            raise SystemExit(f"layers {bad} out of range: {args.model} has {m.num_layers} layers")
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, m.config.vocab_size, (args.prompt,), generator=gen).tolist()
        with m.session() as s:
            reference = s.generate(prompt, max_new_tokens=args.new, ignore_eos=True).token_ids
        results: dict = {"layers": {}, "server_device": client.stats().get("device")}
        if hf is not None:
            ids = torch.tensor([prompt], device=device)
            hf_ms: list[float] = []
            with torch.inference_mode():
                for _ in range(args.repeat + 1):
                    _ms(lambda: hf(ids), device, hf_ms)
            results["transformers_forward_ms"] = median(hf_ms[1:])
        results["logits_rounding_measured"] = rounding(m, prompt, reference)
        tol = (args.tie_tolerance if args.tie_tolerance is not None
               else max(TIE_TOLERANCE, TIE_FACTOR * results["logits_rounding_measured"]))
        results["tie_tolerance"] = tol
        print(f"logits of two correct computations differ by up to {results['logits_rounding_measured']:.3g}; "
              f"tie tolerance {tol:.3g}", flush=True)
        for layer in layers:
            print(f"layer {layer}: timing ...", flush=True)
            row = overhead(m, prompt, layer, args.repeat, device)
            print(f"layer {layer}: accuracy ...", flush=True)
            judged_runs = accuracy(m, prompt, layer, args.new, reference, tol)
            row["divergences"] = judged_runs
            row["token_accuracy"] = {k: v["exact"] for k, v in judged_runs.items()}
            row["token_accuracy_tie_adjusted"] = {k: v["tie_adjusted"] for k, v in judged_runs.items()}
            row["verdicts"] = {k: v["verdict"] for k, v in judged_runs.items()}
            results["layers"][str(layer)] = row
            print(f"layer {layer:>2}: forward plain {row['plain_forward_ms']:.2f} ms, pause+resume "
                  f"{row['pause_plus_resume_ms']:.2f} ms ({row['overhead_pct']:+.1f}%); generate plain "
                  f"{row['plain_generate_ms']:.2f} ms, paused+resumed {row['paused_generate_ms']:.2f} ms "
                  f"({row['generate_overhead_pct']:+.1f}%); fetch {row['fetch_ms']:.2f} ms + resume(sent) "
                  f"{row['resume_with_sent_activation_ms']:.2f} ms vs resume() {row['resume_ms']:.2f} ms; "
                  f"token accuracy {row['token_accuracy']}, tie-adjusted {row['token_accuracy_tie_adjusted']}, "
                  f"{row['verdicts']}", flush=True)
        rows = results["layers"].values()
        results["summary"] = {
            "median_overhead_pct": median([r["overhead_pct"] for r in rows]),
            "max_overhead_pct": max(r["overhead_pct"] for r in rows),
            "max_generate_overhead_pct": max(r["generate_overhead_pct"] for r in rows),
            "min_token_accuracy": min(min(r["token_accuracy"].values()) for r in rows),
            "min_token_accuracy_tie_adjusted": min(min(r["token_accuracy_tie_adjusted"].values()) for r in rows),
            "runs_wrong": sum(v == "wrong" for r in rows for v in r["verdicts"].values()),
            "runs_near_tie": sum(v == "near_tie" for r in rows for v in r["verdicts"].values()),
            "median_round_trip_extra_ms": median([r["round_trip_extra_ms"] for r in rows]),
        }
        print(f"summary: {results['summary']}" + (f"; transformers forward {results['transformers_forward_ms']:.2f} ms"
                                                   if "transformers_forward_ms" in results else ""))
        params = {**vars(args), "client": "remote" if args.address else "embedded"}
        write(record("whitebox", device, params, results), args.out)
    finally:
        client.close()
    return 0
