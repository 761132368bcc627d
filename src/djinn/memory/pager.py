"""Moving KV blocks between the device pool and the host arena, off the compute path.

A ``Transfer`` is one park (device -> host) or restore (host -> device) of a list of blocks.
Consecutive blocks on both sides are coalesced into one copy (``runs``), so a session whose
blocks are contiguous moves with a handful of large copies.

- On CUDA each direction has its own stream (device->host and host->device copies overlap each
  other and the compute stream), copies are ``non_blocking`` from/to pinned memory (the DMA
  engines do the work, no SM kernels), and completion is a CUDA event: ``done()`` polls it,
  ``wait()`` blocks only on it, never on the device as a whole.
- On CPU each direction has its own copy thread; torch's copies release the GIL, so the engine
  loop keeps computing while a copy runs, as on a GPU.

The pager never frees or allocates blocks: whoever submitted a transfer keeps its source and
destination blocks held until ``done()`` is true (engine.residency does this).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from djinn.memory.blocks import BlockPool
from djinn.memory.host import HostArena

OUT, IN = "out", "in"        # park (device -> host), restore (host -> device)


def runs(device_blocks: list[int], host_blocks: list[int], chunk_blocks: int) -> Iterator[tuple[int, int, int]]:
    """Coalesce paired block lists into ``(device_first, host_first, n)`` runs that are
    consecutive on both sides and do not cross a host chunk."""
    if len(device_blocks) != len(host_blocks):
        raise ValueError("device and host block lists differ in length")
    i = 0
    total = len(device_blocks)
    while i < total:
        d0, h0 = device_blocks[i], host_blocks[i]
        n = 1
        while (i + n < total and device_blocks[i + n] == d0 + n and host_blocks[i + n] == h0 + n
               and (h0 + n) % chunk_blocks != 0):
            n += 1
        yield d0, h0, n
        i += n


@dataclass
class Transfer:
    """One copy job in flight. Times are ``time.perf_counter()`` seconds."""

    direction: str
    nbytes: int
    nblocks: int
    ncopies: int
    t_submitted: float                 # when the caller asked for it
    t_enqueued: float = 0.0            # when its first copy was issued (CUDA) / its thread took it (CPU)
    t_done: float = 0.0                # CPU: when the copies finished; CUDA: when completion was observed
    error: BaseException | None = None
    _event: threading.Event = field(default_factory=threading.Event, repr=False)
    _cuda_start: object = field(default=None, repr=False)
    _cuda_end: object = field(default=None, repr=False)

    def done(self) -> bool:
        """Non-blocking: has the copy finished?"""
        if self._cuda_end is not None:
            if self._event.is_set():
                return True
            if self._cuda_end.query():
                self.t_done = time.perf_counter()
                self._event.set()
                return True
            return False
        return self._event.is_set()

    def wait(self) -> None:
        """Block until this copy (and nothing else) finished."""
        if self._cuda_end is not None and not self._event.is_set():
            self._cuda_end.synchronize()
            self.done()
        self._event.wait()

    def wait_for(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for this copy; True if it finished. (A CUDA event
        cannot be waited on with a timeout: it is polled every 0.2 ms.)"""
        if self._cuda_end is None:
            return self._event.wait(timeout)
        deadline = time.perf_counter() + timeout
        while not self.done():
            if time.perf_counter() >= deadline:
                return False
            time.sleep(0.0002)
        return True

    @property
    def copy_seconds(self) -> float:
        """How long the copies themselves took (CUDA: measured on the stream by events)."""
        if self._cuda_end is not None:
            return self._cuda_start.elapsed_time(self._cuda_end) / 1e3
        return max(self.t_done - self.t_enqueued, 0.0)


class Pager:
    """Issues block copies on the copy streams (CUDA) or copy threads (CPU) and keeps totals."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.recent: collections.deque[Transfer] = collections.deque(maxlen=4096)
        # transfers, bytes, copy seconds, copy calls (runs of consecutive blocks: each costs the
        # thread that issues it a call into the driver)
        self.totals = {OUT: [0, 0, 0.0, 0], IN: [0, 0, 0.0, 0]}
        self._lock = threading.Lock()
        if self.cuda:
            self._streams = {OUT: torch.cuda.Stream(self.device), IN: torch.cuda.Stream(self.device)}
        else:
            self._queues = {OUT: queue.Queue(), IN: queue.Queue()}
            self._threads = [threading.Thread(target=self._worker, args=(self._queues[d],), daemon=True,
                                              name=f"djinn-copy-{d}") for d in (OUT, IN)]
            for t in self._threads:
                t.start()

    # ---- submitting -------------------------------------------------------------------
    def park(self, pool: BlockPool, device_blocks: list[int], arena: HostArena, host_blocks: list[int],
             after: object = None) -> Transfer:
        """Copy device blocks into host blocks. ``after``: a CUDA event the copy must wait for
        (the last compute that wrote these blocks)."""
        pairs = [(arena.run_view(h, n), pool.run_view(d, n))
                 for d, h, n in runs(device_blocks, host_blocks, arena.chunk_blocks)]
        return self._submit(OUT, pairs, len(device_blocks) * pool.shape.block_bytes, len(device_blocks), after)

    def restore(self, arena: HostArena, host_blocks: list[int], pool: BlockPool, device_blocks: list[int],
                after: object = None) -> Transfer:
        """Copy host blocks into device blocks."""
        pairs = [(pool.run_view(d, n), arena.run_view(h, n))
                 for d, h, n in runs(device_blocks, host_blocks, arena.chunk_blocks)]
        return self._submit(IN, pairs, len(device_blocks) * pool.shape.block_bytes, len(device_blocks), after)

    def _submit(self, direction: str, pairs: list, nbytes: int, nblocks: int, after: object) -> Transfer:
        tr = Transfer(direction=direction, nbytes=nbytes, nblocks=nblocks, ncopies=len(pairs),
                      t_submitted=time.perf_counter())
        if self.cuda:
            stream = self._streams[direction]
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                if after is not None:
                    stream.wait_event(after)
                # blocking: a thread waiting for a copy sleeps instead of spinning on the event,
                # which would take a core (and the driver's attention) from the step loop
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True, blocking=True)
                start.record(stream)
                for i, (dst, src) in enumerate(pairs):
                    dst.copy_(src, non_blocking=True)
                    if i == 0:
                        tr.t_enqueued = time.perf_counter()
                end.record(stream)
            tr._cuda_start, tr._cuda_end = start, end
            if not pairs:
                tr.t_enqueued = time.perf_counter()
        else:
            self._queues[direction].put((tr, pairs))
        self.recent.append(tr)
        return tr

    def _worker(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            tr, pairs = item
            tr.t_enqueued = time.perf_counter()
            try:
                for dst, src in pairs:
                    dst.copy_(src)   # releases the GIL: the engine loop keeps running
            except BaseException as exc:  # reported through the transfer; the caller keeps the source
                tr.error = exc
            tr.t_done = time.perf_counter()
            tr._event.set()

    # ---- totals -----------------------------------------------------------------------
    def account(self, tr: Transfer) -> None:
        """Count a finished transfer in the totals (called once per transfer by its owner)."""
        with self._lock:
            t = self.totals[tr.direction]
            t[0] += 1
            t[1] += tr.nbytes
            t[2] += tr.copy_seconds
            t[3] += tr.ncopies

    def stats(self) -> dict:
        with self._lock:
            out = {}
            for d, (n, b, s, c) in self.totals.items():
                out[d] = {"transfers": n, "bytes": b, "copy_seconds": s, "gbps": (b / s / 1e9) if s > 0 else None,
                          "copy_calls": c}
            return out

    def close(self) -> None:
        if self.cuda:
            for s in self._streams.values():
                s.synchronize()
        else:
            for d in (OUT, IN):
                self._queues[d].put(None)
            for t in self._threads:
                t.join(timeout=30)
