"""What a batch step (decode rows mixed with prefill chunks) costs on a Llama-2-7B shape:
run eagerly, and replayed from a captured step graph (engine/graphs.py), each in wall time
(host included) and device time (CUDA events), against the graph replay of the 7 decode rows
alone in the same run. Eager steps are launch-bound, so their wall time depends on the host's
CPU; the record names it. ``--profile`` adds torch.profiler tables of the eager mixed step.

    python3 benchmarks/scripts/mixed_step.py [--out FILE.json] [--profile]
"""
import argparse
import json
import statistics
import time

import torch

from djinn.bench.batched import fill_random
from djinn.config import default_home
from djinn.engine.batch import BatchItem, forward_batch
from djinn.engine.executor import Executor
from djinn.engine.graphs import StepGraphs, buckets_up_to
from djinn.engine.runtime import kv_geometry
from djinn.memory.blocks import BlockPool
from djinn.models import load_model
from djinn.models.adapter import locate

p = argparse.ArgumentParser()
p.add_argument("--model", default="llama2-7b")
p.add_argument("--out", default=None)
p.add_argument("--device", default="cuda")
p.add_argument("--profile", action="store_true")
args = p.parse_args()
dev = torch.device(args.device)
lm = load_model(args.model, device=dev, home=default_home(), progress=False)
ex = Executor(lm.model, locate(lm.model))
kv = kv_geometry(lm.config, 16, lm.dtype)
pool = BlockPool(kv, 1400, dev)
fill_random(pool)
tables = [pool.allocate(90) for _ in range(14)]     # 1,440 tokens each
CTX = 1100


def items(case):
    dec, chunks = case
    out = [BatchItem(tables[i], CTX + i, [5]) for i in range(dec)]
    for j, (start, n) in enumerate(chunks):
        out.append(BatchItem(tables[dec + j], start, [7] * n))
    return out


CASES = {
    "decode x7": (7, []),
    "decode x7 + chunk 65@1100": (7, [(CTX, 65)]),
    "decode x7 + 2 chunks 65@1100": (7, [(CTX, 65), (CTX + 3, 65)]),
    "decode x7 + chunk 512@0": (7, [(0, 512)]),
    "chunk 65@1100": (0, [(CTX, 65)]),
    "decode x11 + chunk 80@1300": (11, [(1300, 80)]),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def timed(fn, reps=20):
    """Median wall ms (synchronised) and median device ms (events) of ``fn``."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    wall, dev_ms = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
        dev_ms.append(a.elapsed_time(b))
    return round(statistics.median(wall), 3), round(statistics.median(dev_ms), 3)


res = {"device": torch.cuda.get_device_name(), "host_cpu": cpu_name(), "torch": torch.__version__,
       "model": args.model, "cases": {}}
t = time.perf_counter()
graphs = StepGraphs(ex, pool, max_context=1440, buckets=buckets_up_to(576), max_seqs=16)
graphs.capture()
res["capture_s"] = round(time.perf_counter() - t, 2)
print(f"captured {len(graphs.captured)} step graphs in {res['capture_s']} s on {res['host_cpu']}", flush=True)
for name, case in CASES.items():
    its = items(case)
    assert graphs.accepts(its), name
    eager = timed(lambda: forward_batch(ex, pool, its))
    graph = timed(lambda: forward_batch(ex, pool, its, graphs=graphs))
    res["cases"][name] = {"eager_wall_ms": eager[0], "eager_device_ms": eager[1],
                          "graph_wall_ms": graph[0], "graph_device_ms": graph[1],
                          "bucket": graphs.layout(its)[0]}
base = res["cases"]["decode x7"]["graph_wall_ms"]
for name, row in res["cases"].items():
    row["graph_over_decode7_graph"] = round(row["graph_wall_ms"] / base, 3)
    print(f"{name:30s} eager {row['eager_wall_ms']:7.2f} ms (device {row['eager_device_ms']:6.2f})   "
          f"graph {row['graph_wall_ms']:6.2f} ms (device {row['graph_device_ms']:6.2f}, bucket {row['bucket']})"
          f"   {row['graph_over_decode7_graph']:.2f}x the 7-decode replay", flush=True)
res["target"] = {"mixed_7_plus_65_over_decode7": res["cases"]["decode x7 + chunk 65@1100"]["graph_over_decode7_graph"],
                 "limit": 1.3}
print(f"target: decode x7 + chunk 65@1100 <= 1.3x the 7-decode replay: {res['target']['mixed_7_plus_65_over_decode7']}x")

if args.profile:
    from torch.profiler import ProfilerActivity, profile

    its = items(CASES["decode x7 + chunk 65@1100"])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            forward_batch(ex, pool, its)
        torch.cuda.synchronize()
    print("--- profile, eager decode x7 + chunk 65@1100 (3 steps) ---")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
if args.out:
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
