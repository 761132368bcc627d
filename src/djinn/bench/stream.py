"""``djinn bench stream``: models larger than the device budget, streamed through a ring of slots.

For each model shape (default: llama2-7b in a 4 GiB device budget, llama2-13b in 8 GiB), in
one run and on the same weights:

- the pinned host -> device link bandwidth, measured with big copies out of the arena;
- Djinn (engine, default slots/chunk): time to first token of a ``--prompt``-token prompt from
  a cold ring, decode ms/token, and the effective bandwidth of both (streamed bytes / time);
- "resident compute": the same prefill with no copies at all (every layer runs on one
  device-resident copy of layer 0's weights, which has every layer's shapes) -> the TTFT
  target ``1.15 x (weight bytes / link + resident compute)``;
- Accelerate ``cpu_offload`` on the same model and prompt (weights in ordinary host memory, as
  its docs have it; ``--accelerate both`` also from the pinned arena);
- a slot-count x chunk-size sweep, each point a fresh engine within the same budget;
- ``torch.cuda.max_memory_allocated()`` against the budget.

``--quick``: tiny-llama on CPU in seconds (a smoke run of every code path; numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from djinn.bench.common import median, record, sync, write
from djinn.client.embedded import resolve_device
from djinn.config import EngineConfig, MemoryConfig, default_home, parse_size
from djinn.engine import Engine, GenerateRequest, SamplingParams
from djinn.memory.budget import DEFAULT_STREAM_SLOTS

SHAPES = {"7b": ("llama2-7b", "4GiB"), "13b": ("llama2-13b", "8GiB")}
GB = 1e9


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="7b,13b", help="comma list of 7b, 13b (default both)")
    p.add_argument("--budget-7b", default=SHAPES["7b"][1])
    p.add_argument("--budget-13b", default=SHAPES["13b"][1])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=16, help="decode steps measured (default configuration)")
    p.add_argument("--sweep-decode", type=int, default=6, help="decode steps measured per sweep point")
    p.add_argument("--slots", default=None, help=f"default ring slots (default {DEFAULT_STREAM_SLOTS})")
    p.add_argument("--chunk", default=None, help="default bytes per copy (default: a layer)")
    p.add_argument("--sweep-slots", default="1,2,3,4,6,8")
    p.add_argument("--sweep-chunks", default="16MiB,64MiB,layer")
    p.add_argument("--accelerate", default="pageable", choices=["pageable", "pinned", "both", "none"])
    p.add_argument("--accelerate-models", default=None, help="models to run Accelerate on (default: --models)")
    p.add_argument("--deadline", type=float, default=510.0, help="seconds; later phases are skipped past it")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny-llama on CPU: a smoke run")
    p.add_argument("--out", default=None)
    return p


class Clock:
    def __init__(self, deadline: float):
        self.t0, self.deadline = time.perf_counter(), deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def late(self) -> bool:
        return self.elapsed() > self.deadline


def link_bandwidth(src: torch.Tensor, device: torch.device, sizes=(64 << 20, 256 << 20, 1 << 30)) -> dict:
    """Host -> device GB/s of single big copies out of ``src`` (the pinned arena)."""
    out = {}
    for size in sizes:
        size = min(size, src.numel())
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        times = []
        for _ in range(5):
            sync(device)
            t = time.perf_counter()
            dst.copy_(src[:size], non_blocking=True)
            sync(device)
            times.append(time.perf_counter() - t)
        out[f"{size / 2**20:g}MiB"] = size / min(times[1:]) / GB
        del dst
    return out


class ComputeOnly:
    """A layer source that binds every layer to one device-resident copy of layer 0's weights:
    the forward's compute with no weight copies (all layers share layer 0's shapes)."""

    def __init__(self, arena, device: torch.device):
        if not all(arena.same_shapes(0, k) for k in range(arena.num_layers)):
            raise ValueError("compute-only needs layers of identical shapes")
        self.arena, self.block = arena, arena.layer_bytes(0).to(device)
        self.views = arena.views_in(self.block, 0, 0)
        self.params = [arena.parameters(k) for k in range(arena.num_layers)]
        self.host = [[p.data for p in ps] for ps in self.params]

    def before_layer(self, i: int) -> None:
        for p, v in zip(self.params[i], self.views):
            p.data = v

    def after_layer(self, i: int) -> None:
        for p, v in zip(self.params[i], self.host[i]):
            p.data = v


def _generate(engine: Engine, name: str, prompt: list[int], new: int):
    """One fresh session's turn: (seconds, result, perf_counter at return)."""
    sid = engine.open_session(name)
    try:
        t = time.perf_counter()
        out = engine.generate(sid, GenerateRequest(list(prompt), SamplingParams(max_new_tokens=new, ignore_eos=True)))
        done = time.perf_counter()
        return done - t, out, done
    finally:
        engine.close_session(sid)


def measure_point(engine: Engine, name: str, prompt: list[int], decode: int, device: torch.device,
                  reps: int = 2) -> dict:
    """Cold-ring TTFT of ``prompt`` and decode ms/token through the engine; effective GB/s.

    Each decode step is timed from one forward's start to the next (a wrapper on the executor's
    ``forward`` records the starts): the median is the steady state, the mean is reported too."""
    rt = engine.runtimes[name]
    st = rt.streamer
    _generate(engine, name, prompt[:16], 4)   # warm this engine: allocator blocks and kernels of decode shapes
    ttft = []
    for _ in range(reps):
        st.invalidate()
        st.synchronize()
        sync(device)
        t, first, _ = _generate(engine, name, prompt, 1)
        ttft.append(t)
    starts: list[float] = []
    forward = rt.executor.forward

    def timed_forward(*a, **k):
        starts.append(time.perf_counter())
        return forward(*a, **k)

    rt.executor.forward = timed_forward
    try:
        before = st.counters["bytes_streamed"]
        _, out, done = _generate(engine, name, prompt[:16], decode + 1)
    finally:
        del rt.executor.forward            # back to the class's method
    steps = [b - a for a, b in zip(starts[1:], starts[2:] + [done])]   # starts[0]: the prompt's forward
    per_step = (st.counters["bytes_streamed"] - before) / (decode + 1)
    step_s, mean_s = median(steps), sum(steps) / len(steps)
    weights = st.arena.nbytes
    return {"ttft_cold_s": ttft, "ttft_s": min(ttft), "prefill_GBps": weights / min(ttft) / GB,
            "decode_step_ms": [x * 1e3 for x in steps],
            "decode_ms_per_token": step_s * 1e3, "decode_ms_per_token_mean": mean_s * 1e3,
            "decode_tokens_per_s": 1 / step_s, "decode_tokens_per_s_mean": 1 / mean_s,
            "decode_GBps": per_step / step_s / GB, "decode_GBps_mean": per_step / mean_s / GB,
            "streamed_bytes_per_forward": per_step, "first_token": first.token_ids[0]}


def accelerate_run(lm, prompt: list[int], decode: int, device: torch.device, pinned: bool, clock: Clock) -> dict:
    """Accelerate's ``cpu_offload`` on a host copy of the same weights (or the arena itself)."""
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        acc = AutoModelForCausalLM.from_config(lm.config, dtype=lm.dtype, attn_implementation="sdpa")
    t = time.perf_counter()
    for name, tensor in [*lm.model.named_parameters(), *lm.model.named_buffers()]:
        if pinned and lm.arena.contains(tensor):
            host = tensor.detach()
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype)   # ordinary (pageable) host memory
            host.copy_(tensor.detach())
        owner, _, leaf = name.rpartition(".")
        mod = acc.get_submodule(owner)
        if leaf in mod._parameters:
            mod._parameters[leaf] = torch.nn.Parameter(host, requires_grad=False)
        else:
            mod._buffers[leaf] = host
    clock.say(f"  accelerate ({'pinned' if pinned else 'pageable'}): host copy in {time.perf_counter() - t:.1f} s")
    acc.eval()
    cpu_offload(acc, execution_device=device)
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def gen(n: int, x=ids, m=mask):
        sync(device)
        t = time.perf_counter()
        out = acc.generate(x, attention_mask=m, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t, out[0, x.shape[1]:].tolist()

    with torch.inference_mode():
        gen(1, ids[:, :8], mask[:, :8])                      # warm-up
        ttft, _ = gen(1)
        total, tokens = gen(1 + decode)
    step = (total - ttft) / decode
    weights = lm.weight_bytes()
    res = {"host_memory": "pinned arena" if pinned else "pageable", "ttft_s": ttft, "decode_ms_per_token": step * 1e3,
           "decode_tokens_per_s": 1 / step, "effective_GBps": weights / step / GB, "tokens": tokens}
    clock.say(f"  accelerate ({res['host_memory']}): TTFT {ttft:.2f} s, {step * 1e3:.0f} ms/token "
              f"({res['effective_GBps']:.1f} GB/s effective)")
    del acc
    gc.collect()
    return res


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()   # give the pinned arena back before the next model pins its own


def run_model(key: str, name: str, budget: str, args, device: torch.device, dtype: torch.dtype, clock: Clock,
              link: dict | None) -> tuple[dict, dict | None]:
    from djinn.models import load_model

    res: dict = {"model": name, "budget": budget}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    clock.say(f"{name}: building with decoder layers in the host arena")
    lm = load_model(name, device=device, dtype=dtype, home=default_home(), offload=True, log=clock.say)
    res["load_s"] = time.perf_counter() - t
    if device.type == "cuda":   # the layers were never on the device together: only one at a time
        res["load_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    arena = lm.arena
    res.update(weight_bytes=lm.weight_bytes(), streamed_bytes=arena.nbytes, layers=arena.num_layers,
               layer_bytes=arena.max_layer_bytes, resident_bytes=lm.weight_bytes(resident_only=True))
    if link is None:
        link = link_bandwidth(arena.buffer, device)
        clock.say("link host->device: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in link.items()))
    link_GBps = max(link.values())
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, lm.config.vocab_size, (args.prompt,), generator=gen).tolist()
    base = dict(gpu_memory=None if device.type == "cpu" else budget, block_size=16,
                kv_blocks=None if device.type == "cuda" else 256)

    def engine(slots, chunk) -> Engine:
        return Engine({name: lm}, EngineConfig(memory=MemoryConfig(**base, offload=True, stream_slots=slots,
                                                                   stream_chunk=chunk)))

    # ---- the default configuration: the headline numbers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eng = engine(args.slots, args.chunk)
    rt = eng.runtimes[name]
    _generate(eng, name, prompt[:32], 2)                       # warm-up (kernels, allocator)
    _generate(eng, name, prompt, 1)
    head = measure_point(eng, name, prompt, args.decode, device, reps=3)
    head["slots"], head["chunk_bytes"] = rt.streamer.num_slots, rt.streamer.chunk_bytes
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        head.update(max_memory_allocated=peak, within_budget=peak <= parse_size(budget))
    rt.executor.layer_source = ComputeOnly(arena, device)     # the same prefill, no copies at all
    _generate(eng, name, prompt, 1)
    compute = min(_generate(eng, name, prompt, 1)[0] for _ in range(3))
    rt.executor.layer_source = rt.streamer
    head["resident_compute_s"] = compute
    ideal = arena.nbytes / (link_GBps * GB)
    head["ttft_target_s"] = 1.15 * (ideal + compute)
    head["ttft_vs_copy_plus_compute"] = head["ttft_s"] / (ideal + compute)
    head["prefill_fraction_of_link"] = head["prefill_GBps"] / link_GBps
    head["decode_fraction_of_link"] = head["decode_GBps"] / link_GBps           # median step (steady state)
    head["decode_fraction_of_link_mean"] = head["decode_GBps_mean"] / link_GBps
    clock.say(f"{name} Djinn ({head['slots']} slots): TTFT {head['ttft_s']:.3f} s (target {head['ttft_target_s']:.3f}, "
              f"copy-only {ideal:.3f} + compute {compute:.3f}), prefill {head['prefill_GBps']:.1f} GB/s, decode "
              f"{head['decode_ms_per_token']:.0f} ms/token median = {head['decode_GBps']:.1f} GB/s "
              f"({head['decode_fraction_of_link']:.0%} of link; mean {head['decode_ms_per_token_mean']:.0f} ms = "
              f"{head['decode_fraction_of_link_mean']:.0%})"
              + (f", peak device memory {head['max_memory_allocated'] / 2**30:.2f} GiB of {budget}"
                 if "max_memory_allocated" in head else ""))
    res["djinn"] = head
    eng.shutdown()
    del eng, rt
    _free(device)

    # ---- accelerate on the same weights and prompt
    acc_models = (args.accelerate_models or args.models).split(",")
    res["accelerate"] = {}
    if args.accelerate != "none" and key in acc_models:
        for pinned in {"pageable": [False], "pinned": [True], "both": [False, True]}[args.accelerate]:
            if clock.late():
                res["accelerate"]["skipped"] = "deadline"
                break
            try:
                r = accelerate_run(lm, prompt, min(args.decode, 3), device, pinned, clock)
            except Exception as exc:
                res["accelerate"]["pinned" if pinned else "pageable"] = {"error": f"{type(exc).__name__}: {exc}"}
                clock.say(f"  accelerate failed: {exc}")
                _free(device)
                continue
            r["first_token_equals_djinn"] = r.pop("tokens")[0] == head["first_token"]
            res["accelerate"]["pinned" if pinned else "pageable"] = r
            _free(device)
        if "pageable" in res["accelerate"]:
            a = res["accelerate"]["pageable"]
            # Accelerate's ms/token is a mean over its decode steps: compare with Djinn's mean
            res["speedup_decode_tokens_per_s"] = head["decode_tokens_per_s_mean"] / a["decode_tokens_per_s"]
            res["speedup_ttft"] = a["ttft_s"] / head["ttft_s"]

    # ---- the sweep: a fresh engine (and KV pool) per point, all within the budget
    sweep = []
    for slots in [int(x) for x in args.sweep_slots.split(",") if x]:
        for chunk in [c for c in args.sweep_chunks.split(",") if c]:
            if clock.late():
                sweep.append({"slots": slots, "chunk": chunk, "skipped": "deadline"})
                continue
            point: dict = {"slots": slots, "chunk": chunk}
            eng = None
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                eng = engine(slots, None if chunk == "layer" else chunk)
                point.update(measure_point(eng, name, prompt, args.sweep_decode, device, reps=2))
                point.pop("first_token")
                if device.type == "cuda":
                    point["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
            except Exception as exc:  # a point that does not fit the budget is a result too
                point["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                if eng is not None:   # always: a failed point's engine must not keep its ring and KV pool
                    eng.shutdown()
                eng = None
                gc.collect()
            sweep.append(point)
            clock.say(f"  sweep {slots} slots, chunk {chunk}: " + (point.get("error") or point.get("skipped") or
                      f"TTFT {point['ttft_s']:.3f} s ({point['prefill_GBps']:.1f} GB/s), decode "
                      f"{point['decode_ms_per_token']:.0f} ms/token ({point['decode_GBps']:.1f} GB/s)"))
    res["sweep"] = sweep
    del lm, arena
    _free(device)
    return res, link


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    clock = Clock(args.deadline)
    if args.quick:
        device = torch.device("cpu")
        args.prompt, args.decode, args.sweep_decode, args.sweep_slots, args.sweep_chunks = 48, 4, 3, "1,2,3", "64KiB,layer"
        args.slots = args.slots or "2"   # fewer slots than tiny-llama's 3 layers, or nothing streams
        models = [("tiny", "tiny-llama", "none")]
    else:
        device = resolve_device(args.device)
        models = [(k, SHAPES[k][0], getattr(args, f"budget_{k}")) for k in args.models.split(",") if k]
    args.slots = int(args.slots) if args.slots else None
    args.accelerate_models = args.accelerate_models or ("tiny" if args.quick else args.models)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    results, link = {}, None
    for key, name, budget in models:
        if clock.late():
            results[name] = {"skipped": "deadline"}
            continue
        try:
            results[name], link = run_model(key, name, budget, args, device, dtype, clock, link)
        except Exception as exc:  # keep the other model's numbers
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        _free(device)
        write(record("stream", device, dict(vars(args)), {"partial": True, "link_GBps": link, "models": results}),
              args.out, stem="stream-partial")
    summary = {"link_GBps": link, "elapsed_s": clock.elapsed(), "models": results}
    clock.say("done")
    for name, r in results.items():
        if "djinn" not in r:
            continue
        d = r["djinn"]
        checks = {"decode (median step) >= 90% of link": d["decode_fraction_of_link"] >= 0.9,
                  "decode (mean step) >= 90% of link": d["decode_fraction_of_link_mean"] >= 0.9,
                  "prefill >= 90% of link": d["prefill_fraction_of_link"] >= 0.9,
                  "TTFT <= 1.15 x (copy + compute)": d["ttft_s"] <= d["ttft_target_s"]}
        if "speedup_decode_tokens_per_s" in r:
            checks[">= 5x Accelerate tokens/s"] = r["speedup_decode_tokens_per_s"] >= 5
        if "within_budget" in d:
            checks["device memory within budget"] = d["within_budget"]
        r["targets"] = checks
        print(f"{name}: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())
              + (f"; {r['speedup_decode_tokens_per_s']:.1f}x Accelerate" if "speedup_decode_tokens_per_s" in r else ""))
    write(record("stream", device, {k: v for k, v in vars(args).items()}, summary), args.out)
    return 0
