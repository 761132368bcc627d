"""The host arena: pinned host memory where parked KV lives, in blocks shaped like the device's.

A host block has exactly the geometry of a device block (``[layers, 2, block_size, kv_heads,
head_dim]``), so a block moves between tiers with one contiguous copy, and runs of consecutive
blocks with one copy for the whole run.

The arena is allocated once, in big chunks (``chunk_bytes``, 1 GiB by default), and never
churned afterwards. Pinning costs about 0.65 s per GiB on CUDA, so with ``background=True`` the
first chunk is pinned at once (parking works from the first request) and a thread pins the
others one after another while the server already serves; a chunk's blocks become usable when
it lands. On CPU nothing is pinned ("host" and "device" are both RAM) and
the chunks are plain (lazily committed) allocations.

Invariants:
- block ids are global (``chunk * chunk_blocks + offset``); a run copied at once never crosses a
  chunk;
- a block is free or held, never both; a held block has a reference count >= 1: one per session
  or copy in flight holding it (forks of a parked session share its blocks, never write them);
- the free set hands out one run of consecutive ids when one is long enough, else the lowest
  ids (``memory.freelist``), so a session's moves coalesce into few large copies.

Only accounting and storage live here; the caller (engine.residency) holds its own lock around
allocate/release, and the arena's small lock only guards the grower thread's additions.
"""

from __future__ import annotations

import threading
import time

import torch

from djinn.errors import CapacityError
from djinn.memory.blocks import KVShape
from djinn.memory.freelist import FreeBlocks

DEFAULT_CHUNK_BYTES = 1 << 30


def _pin(t: torch.Tensor) -> torch.Tensor:
    """Page-lock ``t`` in place. cudaHostRegister pins exactly the bytes asked for (torch's
    pinned allocator rounds each allocation up to a power of two)."""
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed with error {int(err)}")
    return t


def _unpin(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class HostArena:
    """Fixed-size arena of KV blocks in (pinned) host memory."""

    def __init__(self, shape: KVShape, num_blocks: int, pin: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, background: bool | None = None):
        self.shape = shape
        self.target_blocks = max(0, int(num_blocks))
        self.pin = pin
        self.chunk_blocks = max(1, min(chunk_bytes // shape.block_bytes, max(1, self.target_blocks)))
        self.dims = (shape.num_layers, 2, shape.block_size, shape.kv_heads, shape.head_dim)
        self._chunks: list[torch.Tensor] = []
        self._free = FreeBlocks()            # runs of consecutive ids first (memory.freelist)
        self._held: dict[int, int] = {}      # held block -> reference count (forks share parked KV)
        self._landed = 0
        self._lock = threading.Lock()
        self.on_free = None                  # called (under the arena's lock) with each block freed (memory.prefix)
        self._stop = False
        self._ready = threading.Event()
        self.error: str | None = None        # why the arena stopped short of its target, if it did
        self.pin_seconds = 0.0
        background = pin if background is None else background
        self._thread = None
        if background and self.target_blocks > self.chunk_blocks:
            self._grow(max_chunks=1)
            if self.error is None:
                self._ready.clear()
                self._thread = threading.Thread(target=self._grow, name="djinn-host-arena", daemon=True)
                self._thread.start()
        else:
            self._grow()

    # ---- growth -----------------------------------------------------------------------
    def _grow(self, max_chunks: int | None = None) -> None:
        try:
            while not self._stop and self._landed < self.target_blocks and max_chunks != 0:
                if max_chunks is not None:
                    max_chunks -= 1
                n = min(self.chunk_blocks, self.target_blocks - self._landed)
                t0 = time.perf_counter()
                chunk = torch.empty((n, *self.dims), dtype=self.shape.dtype)
                if self.pin:
                    _pin(chunk)
                self.pin_seconds += time.perf_counter() - t0
                with self._lock:
                    first = self._landed
                    self._chunks.append(chunk)
                    self._free.grow(first + n)
                    self._free.add_range(first, n)
                    self._landed += n
        except Exception as exc:  # out of host memory: serve with what landed
            self.error = f"host arena stopped at {self._landed} of {self.target_blocks} blocks: {exc}"
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every chunk landed (or growth stopped). True if it finished in time."""
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    # ---- accounting -------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Blocks usable now (chunks that landed)."""
        return self._landed

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return len(self._held)

    @property
    def used_bytes(self) -> int:
        return self.used_count * self.shape.block_bytes

    @property
    def total_bytes(self) -> int:
        return self._landed * self.shape.block_bytes

    @property
    def target_bytes(self) -> int:
        return self.target_blocks * self.shape.block_bytes

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks or none (all-or-nothing), one run of consecutive ids if one is free."""
        with self._lock:
            if n > len(self._free):
                raise CapacityError(f"host arena is full: need {n} block(s), {len(self._free)} free of {self._landed}")
            out = self._free.take(n)
            self._held.update((b, 1) for b in out)
        return out

    def share(self, blocks: list[int]) -> None:
        """Add one reference to each held block (a fork of a parked session shares its KV)."""
        with self._lock:
            for b in blocks:
                if b not in self._held:
                    raise RuntimeError(f"sharing host block {b} that is not held")
                self._held[b] += 1

    def refcount(self, block: int) -> int:
        return self._held.get(block, 0)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero are free again."""
        with self._lock:
            for b in blocks:
                if b not in self._held:
                    raise RuntimeError(f"releasing host block {b} that is not held")
                self._held[b] -= 1
                if self._held[b] == 0:
                    del self._held[b]
                    self._free.add(b)
                    if self.on_free is not None:
                        self.on_free(b)

    # ---- views ------------------------------------------------------------------------
    def locate(self, block: int) -> tuple[int, int]:
        return divmod(block, self.chunk_blocks)

    def run_view(self, first: int, n: int) -> torch.Tensor:
        """``[n, layers, 2, block_size, kv_heads, head_dim]`` view of blocks ``first .. first+n-1``
        (one chunk)."""
        c, off = self.locate(first)
        if off + n > self.chunk_blocks:
            raise ValueError(f"host run {first}+{n} crosses a chunk boundary")
        return self._chunks[c][off:off + n]

    def close(self) -> None:
        """Stop growing and unpin. The arena is unusable afterwards."""
        self._stop = True
        if self._thread is not None:
            self._thread.join()
        if self.pin:
            for chunk in self._chunks:
                try:
                    _unpin(chunk)
                except Exception:  # pragma: no cover - best effort at shutdown
                    pass
        self._chunks = []
        self._free = []
        self._held = {}
        self._landed = 0
