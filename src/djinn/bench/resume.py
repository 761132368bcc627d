"""``djinn bench resume``: how long it takes to get a parked or paused session going again.

Context part (a Llama-2-7B shape with a 16K window; 1K, 4K and 16K tokens), time to the first
token of a resumed session by:
  (a) recompute: a fresh Djinn session given the whole history (and, as an outside reference,
      plain transformers doing the same);
  (b) manual offload: user code with plain transformers moving a ``DynamicCache`` to the CPU
      and back (``djinn.bench.resume_offload``: pageable ``.to()``, and pinned buffers on CUDA);
  (c) Djinn: signal IO_WAIT, wait until ``session.info()["kv_location"]`` says the KV is in host
      memory (if the server parks; the JSON says whether it did), then signal ACTIVE and
      generate one token at once: the wall time from ACTIVE to the token, with the server's
      restore_ms and TTFT. The same session without the IO_WAIT is the floor (KV resident).

Depth part (a Llama-2-13B shape, 2,048 tokens, pauses after 1, 10, 20, 30, 40 layers): needs
white-box (``sess.forward(ids, breakpoint=N)`` returning a ``Paused``); without it the JSON
says "unavailable". Recompute: a fresh session's ``forward(ids, breakpoint=b-1)``, the time to
get back to where the pause was. Djinn: two sessions paused at the same layer, one left alone
and one signalled IO_WAIT and (if the server parks paused sessions) parked; both ``resume()``
(the parked one timed from its ACTIVE signal, which starts the restore); the difference is the
restore cost at that depth. On CUDA each timing waits for the device's queued work: a paused
forward returns once its layers are queued.

Only the public client API measures Djinn. Where the lines cross is computed and printed.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

import djinn
from djinn.bench.common import median, record, write
from djinn.bench.metrics import crossings, wait_host_ready
from djinn.bench.resume_offload import measure_context
from djinn.client.embedded import resolve_device, resolve_dtype
from djinn.config import default_home

PARKED = ("host", "parked")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench resume", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b-16k")
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16000],
                   help="history lengths; each run adds a few tokens, so stay a little under the window")
    p.add_argument("--depth-model", default="llama2-13b")
    p.add_argument("--depth-tokens", type=int, default=2048)
    p.add_argument("--layers", nargs="+", type=int, default=[1, 10, 20, 30, 40],
                   help="pause after this many decoder layers (breakpoint index = layers - 1)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--host-memory", default="24GiB", help="host memory for parked KV (16K tokens of 7B: 8 GiB)")
    p.add_argument("--park-timeout-s", type=float, default=10.0, help="how long to wait for the KV to reach host")
    p.add_argument("--skip", nargs="*", default=[], choices=["context", "depth", "manual"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny-llama on the CPU, small contexts: a smoke run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None)
    return p


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    """Random ids away from special ids: the byte vocabulary's (256..258) and low ids (0..2)."""
    high = 256 if vocab <= 512 else vocab
    return [int(x) for x in np.random.default_rng(seed).integers(3, high, n)]


def wait_parked(sess, timeout_s: float) -> tuple[bool, float, str | None]:
    """Poll ``sess.info()`` until the KV is in host memory; (parked, seconds waited, last location)."""
    t = time.perf_counter()
    where = None
    while True:
        where = sess.info().get("kv_location")
        if where in PARKED:
            return True, time.perf_counter() - t, where
        if time.perf_counter() - t > timeout_s:
            return False, time.perf_counter() - t, where
        # a server may settle finished copies lazily, on its next stats or turn (the memory
        # branch's session info did, when this was written): asking for stats lets it
        sess.model.client.stats()
        time.sleep(0.005)


def _ttft(timings: dict) -> float | None:
    if "ttft_ms" in timings:
        return timings["ttft_ms"]
    if "prefill_ms" not in timings:
        return None
    return timings.get("queue_ms", 0.0) + timings.get("restore_ms", 0.0) + timings["prefill_ms"]


def djinn_context(client, name: str, history: list[int], repeat: int, park_timeout: float) -> dict:
    """Recompute (fresh session), restore (IO_WAIT -> parked -> ACTIVE -> 1 token), resident floor."""
    m = client.model(name)
    recompute = []
    for _ in range(repeat + 1):
        s = m.session()
        t = time.perf_counter()
        r = s.generate(history, max_new_tokens=1, ignore_eos=True)
        recompute.append(((time.perf_counter() - t) * 1e3, _ttft(r.timings)))
        s.close()
    s = m.session()
    first = s.generate(history, max_new_tokens=1, ignore_eos=True)
    nxt = first.token_ids[-1]
    resident, restore = [], []
    for i in range(repeat + 1):
        t = time.perf_counter()
        r = s.generate([nxt], max_new_tokens=1, ignore_eos=True)
        resident.append(((time.perf_counter() - t) * 1e3, _ttft(r.timings), r.computed_tokens))
        nxt = r.token_ids[-1]
        s.signal_phase("IO_WAIT")
        parked, waited, where = wait_parked(s, park_timeout)
        if not parked:  # this server does not park (yet): don't wait the full timeout every time
            park_timeout = min(park_timeout, 0.2)
        t = time.perf_counter()
        s.signal_phase("ACTIVE")
        r = s.generate([nxt], max_new_tokens=1, ignore_eos=True)
        wall = (time.perf_counter() - t) * 1e3
        restore.append({"resume_ms": wall, "ttft_ms": _ttft(r.timings), "restore_ms": r.timings.get("restore_ms"),
                        "computed_tokens": r.computed_tokens, "cached_tokens": r.cached_tokens, "parked": parked,
                        "park_wait_s": waited, "kv_location_before": where})
        nxt = r.token_ids[-1]
    s.close()
    timed = restore[1:]
    return {
        "recompute_ms": median([w for w, _ in recompute[1:]]),
        "recompute_ttft_ms": median([x for _, x in recompute[1:] if x is not None] or [float("nan")]),
        "resident_ms": median([w for w, _, _ in resident[1:]]),
        "restore_ms": median([x["resume_ms"] for x in timed]),
        "restore_ttft_ms": median([x["ttft_ms"] for x in timed if x["ttft_ms"] is not None] or [float("nan")]),
        "restore_server_restore_ms": median([x["restore_ms"] for x in timed if x["restore_ms"] is not None] or
                                            [float("nan")]),
        "parked": all(x["parked"] for x in timed),
        "restore_runs": timed,
    }


def context_part(args, device, dtype) -> dict:
    from djinn.models.presets import PRESETS

    preset = PRESETS.get(args.model)
    window = getattr(preset.build(), "max_position_embeddings", None) if preset else None
    extra = 2 * (args.repeat + 2)            # the tokens djinn_context appends to each history
    if window and max(args.contexts) + extra > window:
        raise SystemExit(f"djinn bench resume: --contexts up to {max(args.contexts)} plus {extra} tokens of turns "
                         f"exceed {args.model}'s {window}-token window; use at most {window - extra}")
    rows: dict[int, dict] = {n: {"tokens": n} for n in args.contexts}
    bar = _bar(len(args.contexts) * (1 if "manual" in args.skip else 2), "resume: context", not args.no_progress)
    vocab = None
    if "manual" not in args.skip:
        from djinn.models import load_model

        lm = load_model(args.model, device=device, dtype=dtype, home=default_home(), seed=args.seed, progress=False)
        vocab = lm.config.vocab_size
        for n in args.contexts:
            rows[n]["manual"] = measure_context(lm.model, _tokens(n, vocab, args.seed + n), args.repeat, device)
            bar.update(1)
        del lm
        _free()
    # semantic-park: every IO_WAIT parks at once (semantic would keep the KV of these quick waits)
    client = djinn.connect(models=[args.model], device=str(device), dtype=args.dtype, gpu_memory=args.gpu_memory,
                           host_memory=args.host_memory, policy="semantic-park", seed=args.seed)
    try:
        vocab = client.model(args.model).config.vocab_size
        wait_host_ready(client)
        for n in args.contexts:
            rows[n]["djinn"] = djinn_context(client, args.model, _tokens(n, vocab, args.seed + n), args.repeat,
                                             args.park_timeout_s)
            bar.update(1)
    finally:
        client.close()
        del client
        _free()
    bar.close()
    xs = list(args.contexts)
    curves = {
        "recompute (Djinn)": [rows[n]["djinn"]["recompute_ms"] for n in xs],
        "Djinn restore": [rows[n]["djinn"]["restore_ms"] for n in xs],
        "resident (floor)": [rows[n]["djinn"]["resident_ms"] for n in xs],
    }
    if "manual" not in args.skip:
        curves["recompute (transformers)"] = [rows[n]["manual"]["recompute_ms"] for n in xs]
        curves["manual offload, pageable"] = [rows[n]["manual"]["offload_pageable"]["resume_ms"] for n in xs]
        if device.type == "cuda":
            curves["manual offload, pinned"] = [rows[n]["manual"]["offload_pinned"]["resume_ms"] for n in xs]
    return {"model": args.model, "x": xs, "x_label": "context tokens", "curves": curves,
            "crossings": _crossings(xs, curves), "rows": [rows[n] for n in xs]}


def _crossings(xs: list, curves: dict) -> dict:
    """Where each recompute curve crosses each curve that keeps state (restore, offload, floor)."""
    out = {}
    for a in (k for k in curves if k.startswith("recompute")):
        for b in (k for k in curves if not k.startswith("recompute")):
            cross = crossings(xs, curves[a], curves[b])
            if cross:
                out[f"{a} x {b}"] = cross
    return out


def depth_part(args, device) -> dict:
    client = djinn.connect(models=[args.depth_model], device=str(device), dtype=args.dtype,
                           gpu_memory=args.gpu_memory, host_memory=args.host_memory, policy="semantic-park",
                           seed=args.seed)
    try:
        m = client.model(args.depth_model)
        wait_host_ready(client)
        probe = m.session()
        if not hasattr(probe, "forward"):
            probe.close()
            return {"status": "unavailable", "reason": "this client has no white-box Session.forward(ids, breakpoint=N)"}
        probe.close()
        ids = _tokens(args.depth_tokens, m.config.vocab_size, args.seed)
        layers = [b for b in args.layers if 1 <= b <= m.num_layers]
        rows = []
        bar = _bar(len(layers), "resume: depth", not args.no_progress)
        for b in layers:
            rows.append(_depth_row(m, ids, b, args.repeat, args.park_timeout_s, _syncer(device)))
            bar.update(1)
        bar.close()
    finally:
        client.close()
        del client
        _free()
    xs = [r["layers"] for r in rows]
    curves = {"recompute to the pause": [r["recompute_ms"] for r in rows],
              "Djinn restore": [r["restore_ms"] for r in rows]}
    return {"status": "ok", "model": args.depth_model, "tokens": args.depth_tokens, "x": xs,
            "x_label": "layers run before the pause", "curves": curves, "crossings": _crossings(xs, curves),
            "rows": rows, "skipped_layers": [b for b in args.layers if b not in xs]}


def _syncer(device):
    """Waits for the device's queued work: a paused forward returns once its layers are queued,
    not run (the embedded engine shares this process's CUDA context, so this waits for them)."""
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _depth_row(m, ids: list[int], layers: int, repeat: int, park_timeout: float, sync=lambda: None) -> dict:
    bp = layers - 1
    recompute, resident, parked_ms, parked_flags, notes = [], [], [], [], set()
    for _ in range(repeat + 1):
        s = m.session()
        sync()
        t = time.perf_counter()
        p = s.forward(ids, breakpoint=bp)
        sync()
        recompute.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        p.resume()
        sync()
        resident.append((time.perf_counter() - t) * 1e3)
        s.close()
        s = m.session()
        p = s.forward(ids, breakpoint=bp)
        parked = False
        try:
            s.signal_phase("IO_WAIT")
            parked, _, _ = wait_parked(s, park_timeout)
            if not parked:
                park_timeout = min(park_timeout, 0.2)
        except djinn.DjinnError as exc:
            notes.add(f"IO_WAIT on a paused session refused: {type(exc).__name__}: {exc}")
        sync()
        t = time.perf_counter()     # from ACTIVE (which starts the restore) to the resumed forward's end
        try:
            s.signal_phase("ACTIVE")
        except djinn.DjinnError as exc:
            notes.add(f"ACTIVE on a paused session refused: {type(exc).__name__}: {exc}")
        p.resume()
        sync()
        parked_ms.append((time.perf_counter() - t) * 1e3)
        parked_flags.append(parked)
        s.close()
    was_parked = all(parked_flags[1:])
    diff = median(parked_ms[1:]) - median(resident[1:])
    return {"layers": layers, "breakpoint": bp, "recompute_ms": median(recompute[1:]),
            "resume_resident_ms": median(resident[1:]), "resume_parked_ms": median(parked_ms[1:]),
            "parked": was_parked, "restore_ms": max(0.0, diff) if was_parked else None, "notes": sorted(notes)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.model, args.depth_model, args.device = "tiny-llama", "tiny-llama", "cpu"
        args.contexts, args.depth_tokens, args.layers = [64, 128, 256], 64, [1, 2, 3]
        args.repeat, args.host_memory, args.park_timeout_s = 2, "16MiB", 1.0
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    results: dict = {}
    if "context" not in args.skip:
        results["context"] = context_part(args, device, dtype)
        for k, v in results["context"]["curves"].items():
            print(f"{k}: " + ", ".join(f"{n}: {x:.1f} ms" for n, x in zip(results["context"]["x"], v)))
        print(f"crossings (context tokens): {results['context']['crossings'] or 'none'}")
    if "depth" not in args.skip:
        results["depth"] = depth_part(args, device)
        if results["depth"]["status"] == "ok":
            for k, v in results["depth"]["curves"].items():
                print(f"{k}: " + ", ".join(f"{n}: {'-' if x is None else f'{x:.1f}'} ms"
                                           for n, x in zip(results["depth"]["x"], v)))
            print(f"crossings (layers): {results['depth']['crossings'] or 'none'}")
        else:
            print(f"depth part: {results['depth']['reason']}")
    params = {k: v for k, v in vars(args).items()}
    params["manual_offload_variants"] = ["pageable", "pinned"] if device.type == "cuda" else ["pageable"]
    write(record("resume", device, params, results), args.out)
    return 0
