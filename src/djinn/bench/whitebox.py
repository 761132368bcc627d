"""``djinn bench whitebox``: breakpoints on a real model shape, through the client API.

For each breakpoint layer (default 1, 8, 16, 24, 31 of the Llama-2-7B shape, 512-token prompt):

- token accuracy: greedy continuation (``--new`` tokens) after pausing at that layer of the
  prefill and resuming unchanged, after resuming with the fetched activation sent back, and
  after pausing at a decode step, each against a plain generation of the same prompt;
- overhead: ``forward(prompt, breakpoint=L)`` + ``resume()`` against one plain
  ``forward(prompt)`` (median of ``--repeat`` interleaved runs; target <= 5%, no transfer);
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
    """Plain forward vs forward-to-breakpoint + resume (no transfer), interleaved; and the
    activation round trip (fetch, resume with it) vs resume()."""
    plain, paused, to_pause, resume, fetch, resume_sent = [], [], [], [], [], []
    for i in range(repeat + 1):           # the first round warms up and is dropped
        with m.session() as s:
            _ms(lambda: s.forward(prompt), device, plain)
        with m.session() as s:
            t0 = len(to_pause)
            p = _ms(lambda: s.forward(prompt, breakpoint=layer), device, to_pause)
            _ms(p.resume, device, resume)
            paused.append(to_pause[t0] + resume[-1])
        with m.session() as s:
            p = s.forward(prompt, breakpoint=layer)
            sync(device)
            h = _ms(p.activation.fetch, device, fetch)
            _ms(lambda: p.resume(h), device, resume_sent)
        if i == 0:
            for xs in (plain, paused, to_pause, resume, fetch, resume_sent):
                xs.clear()
    res = {
        "plain_forward_ms": median(plain), "pause_plus_resume_ms": median(paused),
        "forward_to_pause_ms": median(to_pause), "resume_ms": median(resume),
        "overhead_pct": (median(paused) / median(plain) - 1) * 100,
        "fetch_ms": median(fetch), "resume_with_sent_activation_ms": median(resume_sent),
        "round_trip_extra_ms": median(fetch) + median(resume_sent) - median(resume),
        "activation_shape": list(h.shape), "activation_bytes": h.numel() * h.element_size(),
        "samples": {"plain": plain, "pause_plus_resume": paused, "fetch": fetch, "resume_sent": resume_sent},
    }
    return res


def accuracy(m, prompt: list[int], layer: int, new: int, reference: list[int]) -> dict:
    out = {}
    for label, step, send_back in (("prefill_resume", 0, False), ("prefill_round_trip", 0, True),
                                   ("decode_resume", new // 2, False)):
        with m.session() as s:
            p = s.generate(prompt, max_new_tokens=new, ignore_eos=True, breakpoint=(layer, step))
            tokens = (p.resume(p.activation.fetch()) if send_back else p.resume()).token_ids
        out[label] = sum(a == b for a, b in zip(tokens, reference)) / len(reference)
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
        for layer in layers:
            print(f"layer {layer}: timing ...", flush=True)
            row = overhead(m, prompt, layer, args.repeat, device)
            print(f"layer {layer}: accuracy ...", flush=True)
            row["token_accuracy"] = accuracy(m, prompt, layer, args.new, reference)
            results["layers"][str(layer)] = row
            print(f"layer {layer:>2}: plain {row['plain_forward_ms']:.2f} ms, pause+resume "
                  f"{row['pause_plus_resume_ms']:.2f} ms ({row['overhead_pct']:+.1f}%), fetch {row['fetch_ms']:.2f} ms "
                  f"+ resume(sent) {row['resume_with_sent_activation_ms']:.2f} ms vs resume() {row['resume_ms']:.2f} ms; "
                  f"token accuracy {row['token_accuracy']}", flush=True)
        rows = results["layers"].values()
        results["summary"] = {
            "median_overhead_pct": median([r["overhead_pct"] for r in rows]),
            "max_overhead_pct": max(r["overhead_pct"] for r in rows),
            "min_token_accuracy": min(min(r["token_accuracy"].values()) for r in rows),
            "median_round_trip_extra_ms": median([r["round_trip_extra_ms"] for r in rows]),
        }
        print(f"summary: {results['summary']}" + (f"; transformers forward {results['transformers_forward_ms']:.2f} ms"
                                                   if "transformers_forward_ms" in results else ""))
        params = {**vars(args), "client": "remote" if args.address else "embedded"}
        write(record("whitebox", device, params, results), args.out)
    finally:
        client.close()
    return 0
