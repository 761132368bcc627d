"""How much memory each part gets: weights, the device KV pool, workspace, the host arena.

The device budget (``--gpu-memory``) covers weights + KV + workspace. Weights are loaded first;
what is left, less a workspace share for activations, becomes the KV pool, allocated once.
On CPU "device" is RAM; the default there is a modest pool so tests and the demo stay small.

The host budget (``--host-memory``) is pinned host memory for parked KV, shared by the models'
arenas in the order they load. By default each model gets ``DEFAULT_HOST_FACTOR`` times its
device KV pool, never more than half of the machine's RAM in all (pinned memory cannot be
swapped out, so taking all of it would starve the rest of the machine).

A streamed model (djinn.memory.streaming) costs the device only its resident parts plus its
ring of slots; ``should_offload`` decides when a model must be streamed, ``stream_slots`` and
``stream_chunk`` turn the configuration into numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from djinn.config import MemoryConfig, parse_size
from djinn.errors import CapacityError, InvalidRequest

CPU_DEFAULT_KV_BYTES = 1 << 30          # 1 GiB of KV on CPU unless told otherwise
MIN_WORKSPACE_BYTES = 256 << 20
DEFAULT_HOST_FACTOR = 4                 # default host arena: 4x the device KV pool ...
DEFAULT_HOST_RAM_SHARE = 0.5            # ... capped at half of the machine's RAM


def host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


# Weight streaming defaults, from the slot x chunk sweep of `djinn bench stream` on the H100
# (benchmarks/results/stream.md). Prefill ran at 98-99% of the link from 2 slots on. Decode in
# fresh engines: llama2-7b at 80-89% of the link with 3-4 slots and 89-99% with 6; llama2-13b at
# 93-96% with 3 and 95-99% with 4-6; in a warmed engine 3 slots also ran at 99.6%. A decode step
# ends with the host waiting for the sampled token, and only the copies already queued keep the
# link busy until the host has issued the next forward: a deeper ring rides out longer host stalls.
# Whole-layer copies were as fast as, or faster than, 16 or 64 MiB chunks.
DEFAULT_STREAM_SLOTS = 6
DEFAULT_STREAM_CHUNK: int | None = None  # a whole layer per copy
MIN_KV_BYTES = 64 << 20                 # room a model must leave for KV before it is streamed
STREAM_KV_SHARE = 0.25                  # default slots leave at least this share of the budget to KV


def device_total_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


@dataclass
class Budget:
    device_bytes: int | None      # the whole device budget (None on CPU: unbounded but KV default)
    kv_bytes: int                 # bytes for all models' KV pools together

    def describe(self) -> str:
        dev = "unbounded" if self.device_bytes is None else f"{self.device_bytes / 2**30:.2f} GiB"
        return f"device budget {dev}, KV pool {self.kv_bytes / 2**30:.2f} GiB"


def plan(mem: MemoryConfig, device: torch.device, weight_bytes: int) -> Budget:
    """Split the device budget after ``weight_bytes`` are loaded."""
    budget = device_budget(mem, device)
    if budget is None:  # CPU, no budget given
        return Budget(device_bytes=None, kv_bytes=CPU_DEFAULT_KV_BYTES)
    left = budget - weight_bytes
    workspace = max(MIN_WORKSPACE_BYTES, int(left * mem.workspace_fraction)) if left > 0 else 0
    kv = left - workspace
    if kv <= 0:
        raise CapacityError(
            f"device budget {budget / 2**30:.2f} GiB leaves no room for KV after {weight_bytes / 2**30:.2f} GiB of "
            f"weights and {workspace / 2**30:.2f} GiB of workspace: raise --gpu-memory, use --offload, "
            f"or (when streaming weights) lower --stream-slots"
        )
    return Budget(device_bytes=budget, kv_bytes=kv)


def plan_host(mem: MemoryConfig, kv_pool_bytes: int, taken_bytes: int) -> int:
    """Bytes of host arena for one model whose device KV pool is ``kv_pool_bytes``;
    ``taken_bytes``: what the arenas of models loaded earlier already hold."""
    ram = host_ram_bytes()
    given = parse_size(mem.host_memory, ram)
    if given is not None:
        return max(given - taken_bytes, 0)
    budget = DEFAULT_HOST_FACTOR * kv_pool_bytes
    if ram is not None:
        budget = min(budget, int(ram * DEFAULT_HOST_RAM_SHARE) - taken_bytes)
    return max(budget, 0)


def device_budget(mem: MemoryConfig, device: torch.device) -> int | None:
    """The device budget in bytes (None: CPU without one)."""
    total = device_total_bytes(device)
    budget = parse_size(mem.gpu_memory, total)
    if budget is None and total is not None:
        budget = int(total * 0.9)
    return budget


def should_offload(mem: MemoryConfig, device: torch.device, weight_bytes: int) -> bool:
    """Stream a model of ``weight_bytes``? Forced by ``mem.offload`` True/False; automatic (None):
    when its weights leave less than workspace + a minimal KV pool in the device budget."""
    if mem.offload is not None:
        return bool(mem.offload)
    budget = device_budget(mem, torch.device(device))
    return budget is not None and weight_bytes + MIN_WORKSPACE_BYTES + MIN_KV_BYTES > budget


def stream_slots(mem: MemoryConfig | None, device: torch.device | None = None, resident_bytes: int = 0,
                 slot_bytes: int = 0) -> int:
    """Ring slots for a streamed model. Given ones are used as given (the budget then says whether
    they fit); the default is ``DEFAULT_STREAM_SLOTS``, fewer where the device budget less the
    resident weights, the workspace and a ``STREAM_KV_SHARE`` of KV has room for fewer (min 1)."""
    if mem is not None and mem.stream_slots is not None:
        slots = mem.stream_slots
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise InvalidRequest(f"--stream-slots must be a whole number >= 1, got {slots!r}")
        return slots
    budget = device_budget(mem, torch.device(device)) if mem is not None and device is not None else None
    if budget is None or slot_bytes <= 0:
        return DEFAULT_STREAM_SLOTS
    left = budget - resident_bytes
    room = left - MIN_WORKSPACE_BYTES - max(MIN_KV_BYTES, int(left * STREAM_KV_SHARE))
    return max(1, min(DEFAULT_STREAM_SLOTS, room // slot_bytes))


def stream_chunk(mem: MemoryConfig | None) -> int | None:
    """Bytes per host->device copy of a streamed layer (None: one copy per layer)."""
    if mem is None or mem.stream_chunk is None:
        return DEFAULT_STREAM_CHUNK
    chunk = parse_size(mem.stream_chunk)
    if chunk is None or chunk <= 0:
        return None
    if chunk < 64 << 10:
        raise InvalidRequest(f"stream chunk {mem.stream_chunk!r} is below 64 KiB: copies that small run far "
                             "below link speed; use e.g. 64MiB, or 0 for a whole layer per copy")
    return chunk
