"""Diagnostic: what an eager batch step (decode rows mixed with prefill chunks) costs on a
Llama-2-7B shape, with the prefill chunks' attention through gather + SDPA or through the
paged prefill kernel, and where its time goes (torch.profiler). The ``dense`` agents preset's
eager steps took ~50 ms against ~10 ms for a graph-replayed decode step
(agents-dense-cuda-20261126T054445.json, ``loop.step_ms``).

    python3 benchmarks/scripts/mixed_step.py [--out FILE.json]
"""
import argparse
import json
import statistics
import time

import torch

from djinn.attention.triton_paged import TritonPagedBackend
from djinn.bench.batched import fill_random
from djinn.config import default_home
from djinn.engine.batch import BatchItem, forward_batch
from djinn.engine.executor import Executor
from djinn.engine.runtime import kv_geometry
from djinn.memory.blocks import BlockPool
from djinn.models import load_model
from djinn.models.adapter import locate

p = argparse.ArgumentParser()
p.add_argument("--model", default="llama2-7b")
p.add_argument("--out", default=None)
p.add_argument("--device", default="cuda")
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
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "model": args.model, "cases": {}}
for name, case in CASES.items():
    row = {}
    for mode in ("gather", "kernel"):
        be = TritonPagedBackend(prefill=mode)
        its = items(case)
        for _ in range(3):
            forward_batch(ex, pool, its, backend=be)
        sync()
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            forward_batch(ex, pool, its, backend=be)
            sync()
            ts.append((time.perf_counter() - t) * 1e3)
        row[mode] = round(statistics.median(ts), 2)
    res["cases"][name] = row
    print(f"{name:32s} gather {row['gather']:7.2f} ms   kernel {row['kernel']:7.2f} ms", flush=True)

from torch.profiler import ProfilerActivity, profile  # noqa: E402

for mode in ("gather", "kernel"):
    be = TritonPagedBackend(prefill=mode)
    its = items(CASES["decode x7 + chunk 65@1100"])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            forward_batch(ex, pool, its, backend=be)
        sync()
    print(f"--- profile, decode x7 + chunk 65@1100, prefill {mode} (3 steps) ---")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
if args.out:
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
