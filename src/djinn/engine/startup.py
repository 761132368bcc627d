"""From a ``Config`` to a running engine: which device and dtype, and loading models once.

Shared by the embedded client (models load on first use) and ``djinn serve`` (every named
model loads before the first client is accepted). Only names and config strings come in;
``auto`` is resolved here, once, so every part below sees concrete torch objects.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from djinn.config import Config
from djinn.engine.engine import Engine
from djinn.errors import InvalidRequest

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidRequest(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest(f"device {name!r} asked for but CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA and float32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidRequest(f"unknown dtype {name!r}; use auto, float32, float16 or bfloat16") from None


def load_into(engine: Engine, name: str, config: Config, device: torch.device, dtype: torch.dtype,
              progress: bool = True) -> None:
    """Load model ``name`` onto ``device`` and register it with ``engine`` (no-op if loaded)."""
    if name in engine.runtimes:
        return
    from djinn.memory.budget import should_offload
    from djinn.models import load_model

    use_kernel_cache(config.home)
    mem = config.engine.memory
    t = time.perf_counter()
    loaded = load_model(name, device=device, dtype=dtype, home=config.home, seed=config.engine.seed,
                        progress=progress, offload=lambda nbytes: should_offload(mem, device, nbytes),
                        resident_layers=mem.stream_resident_layers)
    engine.add_model(name, loaded, weights_s=time.perf_counter() - t)


def use_kernel_cache(home: Path) -> None:
    """Keep Triton's compiled kernels under Djinn's home (``~/.cache/djinn/triton``) unless the
    user chose a place: a second start then loads them instead of compiling (the step graphs'
    capture runs every kernel once at load)."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(home) / "triton"))


def build_engine(config: Config, progress: bool = True) -> Engine:
    """An engine with every model of ``config.models`` loaded (each once, in order)."""
    device = resolve_device(config.engine.device)
    dtype = resolve_dtype(config.engine.dtype, device)
    if not config.models:
        raise InvalidRequest("no model to serve: name at least one with --model NAME")
    engine = Engine(config=config.engine)
    try:
        for name in dict.fromkeys(config.models):   # a name given twice loads once
            load_into(engine, name, config, device, dtype, progress)
    except BaseException:
        engine.shutdown()
        raise
    return engine
