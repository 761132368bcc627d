"""How much memory each part gets: weights, the device KV pool, workspace, the host arena.

The device budget (``--gpu-memory``) covers weights + KV + workspace. Weights are loaded first;
what is left, less a workspace share for activations, becomes the KV pool, allocated once.
On CPU "device" is RAM; the default there is a modest pool so tests and the demo stay small.

The host budget (``--host-memory``) is pinned host memory for parked KV, shared by the models'
arenas in the order they load. By default each model gets ``DEFAULT_HOST_FACTOR`` times its
device KV pool, never more than half of the machine's RAM in all (pinned memory cannot be
swapped out, so taking all of it would starve the rest of the machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import os

import torch

from djinn.config import MemoryConfig, parse_size
from djinn.errors import CapacityError

CPU_DEFAULT_KV_BYTES = 1 << 30          # 1 GiB of KV on CPU unless told otherwise
MIN_WORKSPACE_BYTES = 256 << 20
DEFAULT_HOST_FACTOR = 4                 # default host arena: 4x the device KV pool ...
DEFAULT_HOST_RAM_SHARE = 0.5            # ... capped at half of the machine's RAM


def host_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


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
    total = device_total_bytes(device)
    budget = parse_size(mem.gpu_memory, total)
    if budget is None and total is not None:
        budget = int(total * 0.9)
    if budget is None:  # CPU, no budget given
        return Budget(device_bytes=None, kv_bytes=CPU_DEFAULT_KV_BYTES)
    left = budget - weight_bytes
    workspace = max(MIN_WORKSPACE_BYTES, int(left * mem.workspace_fraction)) if left > 0 else 0
    kv = left - workspace
    if kv <= 0:
        raise CapacityError(
            f"device budget {budget / 2**30:.2f} GiB leaves no room for KV after {weight_bytes / 2**30:.2f} GiB of "
            f"weights and {workspace / 2**30:.2f} GiB of workspace: raise --gpu-memory or use --offload"
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
