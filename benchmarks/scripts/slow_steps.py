"""Diagnostic (untracked): run `djinn bench agents ...` and, for every batch step over 0.25 s,
record the plan's shape, allocator counters, Triton cache growth and the loop thread's Python stack
sampled while the step was still running."""
import json
import os
import sys
import threading
import time
import traceback

import torch

from djinn.engine import batcher as B

OUT = os.environ.get("DIAG_OUT", "diag.json")
cache = os.environ.get("TRITON_CACHE_DIR")
records, cur = [], {}
T0 = time.perf_counter()


def ncache():
    try:
        return len(os.listdir(cache)) if cache else -1
    except FileNotFoundError:
        return 0


def keys():
    s = torch.cuda.memory_stats()
    return {k: s.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}


orig = B.Batcher._step_model


def wrapped(self, rt, plan):
    t = time.perf_counter()
    before, nc = keys(), ncache()
    cur.update(start=t, tid=threading.get_ident(), stacks=[])
    try:
        return orig(self, rt, plan)
    finally:
        dt = time.perf_counter() - t
        stacks = cur.get("stacks", [])
        cur.clear()
        if dt > 0.25:
            after = keys()
            records.append({"at_s": round(t - T0, 3), "ms": round(dt * 1e3, 1),
                            "items": [[len(c), r.session.num_cached] for r, c in plan][:40],
                            "n_items": len(plan), "alloc": {k: after[k] - before[k] for k in after},
                            "triton_new": ncache() - nc, "stacks": stacks})


def watchdog():
    while True:
        time.sleep(0.05)
        c = dict(cur)
        if c and time.perf_counter() - c["start"] > 0.2 and len(c["stacks"]) < 4:
            f = sys._current_frames().get(c["tid"])
            if f is not None:
                st = traceback.extract_stack(f)[-14:]
                cur.setdefault("stacks", []).append(
                    [round(time.perf_counter() - c["start"], 2)] + [f"{x.filename.split('/')[-1]}:{x.lineno} {x.name}" for x in st])


B.Batcher._step_model = wrapped
threading.Thread(target=watchdog, daemon=True).start()
from djinn.cli import main  # noqa: E402

try:
    rc = main(sys.argv[1:])
finally:
    json.dump(records, open(OUT, "w"), indent=1)
    print(f"diag: {len(records)} slow steps -> {OUT}")
sys.exit(rc)
