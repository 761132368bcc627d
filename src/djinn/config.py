"""One configuration object, built at the edge (CLI, environment, ``connect()`` arguments)
and passed down. Nothing below this module reads environment variables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from djinn.errors import InvalidRequest

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mi": 1024**2, "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
          "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4}


def parse_size(text: str | int | float | None, total: int | None = None) -> int | None:
    """Parse ``40GiB``, ``512MiB``, ``1000000`` or a fraction such as ``0.8`` (of ``total``).

    Returns bytes, or None for None/"auto".
    """
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        if str(text).strip().lower() in ("", "auto"):
            return None
        m = _SIZE_RE.match(str(text))
        if not m:
            raise InvalidRequest(f"cannot parse size {text!r}: use e.g. 40GiB, 512MiB or a fraction like 0.8")
        value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit == "" and 0 < value <= 1.0 and not float(value).is_integer():
        if total is None:
            raise InvalidRequest(f"size {text!r} is a fraction but the total is unknown here; give bytes (e.g. 8GiB)")
        return int(value * total)
    if unit not in _UNITS:
        raise InvalidRequest(f"unknown size unit in {text!r}")
    return int(value * _UNITS[unit])


def default_home() -> Path:
    """Djinn's model cache: ``$DJINN_HOME`` or ``~/.cache/djinn``. Called only at the edge."""
    return Path(os.environ.get("DJINN_HOME") or Path.home() / ".cache" / "djinn")


@dataclass
class MemoryConfig:
    """Budgets. ``gpu_memory``: bytes Djinn may use on the device (weights + KV + workspace);
    ``host_memory``: pinned host bytes for parked KV. None means chosen automatically.

    Weight streaming (djinn.memory.streaming): ``offload`` True keeps every model's decoder
    layers in a pinned host arena and streams them through ``stream_slots`` device slots
    (None: the default from the recorded sweep), copying ``stream_chunk`` bytes per copy
    (None: a whole layer per copy); None (auto) streams a model only when its weights leave
    no room in the device budget; False never streams. Embeddings, norms and the head always
    stay on the device, and so do the first ``stream_resident_layers`` decoder layers."""

    gpu_memory: str | int | float | None = None
    host_memory: str | int | float | None = None
    block_size: int = 16               # tokens per KV block (a block holds all layers)
    kv_blocks: int | None = None       # explicit device block count (tests); overrides the budget
    host_blocks: int | None = None     # explicit host block count (tests); overrides host_memory
    policy: str = "semantic"           # semantic | lru | recompute | resident
    copy_gbps: float = 10.0            # device<->host copy rate assumed until the pager measured one
    host_chunk_bytes: int = 1 << 30    # the host arena is pinned in chunks of this size, in the background
    workspace_fraction: float = 0.10   # share of the free device budget kept for activations
    offload: bool | None = None        # stream decoder layers from host memory: True | None (auto) | False
    stream_slots: int | None = None    # device ring slots for streamed layers
    stream_chunk: str | int | None = None  # bytes per host->device copy, e.g. 64MiB (None: whole layer)
    stream_resident_layers: int = 0   # with streaming, the first this many decoder layers stay on the device


@dataclass
class EngineConfig:
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                # auto | float32 | float16 | bfloat16
    seed: int = 0                      # seed of random-init presets
    max_sessions: int = 4096
    max_tensors_per_session: int = 64              # server-side tensors a session holds (engine/tensors.py)
    max_tensor_bytes_per_session: int = 2 << 30    # ... and their bytes; the oldest are evicted past either
    batching: bool = True              # continuous batching of plain turns (engine/batcher.py)
    prefill_chunk_tokens: int = 512    # prompt tokens per step, shared by all prefilling turns
    max_batch: int = 64                # sequences per step
    cuda_graphs: bool = True           # replay captured decode steps on CUDA
    warmup: bool = True                # on CUDA, capture every decode-graph bucket and run each eager
                                       # step shape once when a model loads, so the first requests do
                                       # not pay for kernels' first use
    prefix_sharing: bool = True        # store identical full KV blocks of one owner once (memory/prefix.py)
    room_wait_s: float = 30.0          # a turn whose KV room is held by running turns waits this long
                                       # for them to end before failing with CapacityError
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5556
    token: str | None = None
    http_port: int | None = None
    lease_seconds: float = 300.0       # a dropped connection's sessions live this long
    max_message_bytes: int = 256 * 1024 * 1024
    shutdown_grace_seconds: float = 10.0   # on SIGINT/SIGTERM, in-flight requests get this long to finish
    max_queued: int = 256              # compute requests waiting for the engine; more get CapacityError
    max_running: int | None = None     # generates started and not finished (batched); None: the engine's max_batch
    max_sessions_per_key: int = 1024   # sessions one principal (token / client key) may own at once
    max_tokens_per_request: int | None = None   # prompt + max_new_tokens of one generate (None: the context)
    journal: str | None = None         # SQLite file of committed session histories (server/journal.py)
    journal_sync: str = "normal"       # "normal": survives a process crash; "full": also a machine crash


@dataclass
class Config:
    models: list[str] = field(default_factory=list)
    home: Path = field(default_factory=default_home)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
