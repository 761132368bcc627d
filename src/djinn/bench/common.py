"""What every benchmark shares: the result record (command, device, date, versions), timing
on the right clock, and writing JSON under ``benchmarks/results/``."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT_OUT = Path("benchmarks/results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def record(bench: str, device: torch.device, params: dict[str, Any], results: Any) -> dict[str, Any]:
    import transformers

    return {
        "bench": bench,
        "command": "djinn bench " + bench + " " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
        "argv": sys.argv,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "params": params,
        "results": results,
    }


def write(rec: dict[str, Any], out: str | Path | None, stem: str | None = None) -> Path:
    out = Path(out) if out else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if "CPU" not in rec["device"] else "cpu"
    name = f"{stem or rec['bench']}-{dev}-{rec['date'][:19].replace(':', '').replace('-', '')}.json"
    path = out / name
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 3, warmup: int = 1) -> tuple[list[float], Any]:
    """Run ``fn`` ``warmup + repeat`` times; return the repeat wall times (s) and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times, result


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
