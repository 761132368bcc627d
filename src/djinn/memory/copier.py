"""Copy engines: host -> device copies that run beside the compute, ordered by fences.

A copy engine owns one ordered queue of copies (a CUDA stream, or a worker thread on CPU)
and hands out *fences*: a fence marks a point in the copy queue ("this copy has landed") or in
the compute ("everything computed so far has finished"). Two rules make the weight ring safe,
and both are expressed with fences only (no host-side waiting on CUDA):

- ``copy(dst, src, after=f)`` starts only once fence ``f`` has passed (the compute that last
  read ``dst`` is done), and returns the fence of its own completion;
- ``wait(f)`` makes all compute issued afterwards wait for ``f`` (the copy has landed).

Copies leave the queue in the order they were issued (one stream / one thread), so a copy into
a buffer never overtakes an earlier copy into the same buffer.

``CudaCopier``: a dedicated copy stream and CUDA events; copies from pinned memory use the
DMA engines (``copy_(non_blocking=True)``), never SM kernels. ``ThreadCopier``: the same
contract on CPU, where "device" and host are both RAM; compute is synchronous there, so a
compute fence is always already passed, and the worker really does copy while the caller
computes (torch releases the GIL), so tests exercise real waiting.
"""

from __future__ import annotations

import queue
import threading
import weakref
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

CopyFn = Callable[[torch.Tensor, torch.Tensor], None]


def _plain_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def chunks(nbytes: int, chunk_bytes: int | None) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges covering ``nbytes`` in pieces of ``chunk_bytes`` (None/0: one piece)."""
    step = nbytes if not chunk_bytes or chunk_bytes >= nbytes else chunk_bytes
    return [(a, min(a + step, nbytes)) for a in range(0, nbytes, max(step, 1))]


class Copier(ABC):
    """One ordered queue of host -> device copies, synchronised with the compute by fences."""

    @abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int | None, after: Any | None) -> Any:
        """Queue ``dst.copy_(src)`` (1-D byte tensors of equal size) in ``chunk_bytes`` pieces,
        starting once ``after`` has passed. Returns the fence of its completion."""

    @abstractmethod
    def compute_fence(self) -> Any:
        """A fence that passes when all compute issued so far has finished."""

    @abstractmethod
    def wait(self, fence: Any) -> None:
        """Make compute issued from now on wait for ``fence``."""

    @abstractmethod
    def synchronize(self) -> None:
        """Block the host until every queued copy has landed."""

    def close(self) -> None:
        """Release the queue (idempotent)."""


class CudaCopier(Copier):
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)

    def copy(self, dst, src, chunk_bytes, after):
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            for a, b in chunks(src.numel(), chunk_bytes):
                dst[a:b].copy_(src[a:b], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def compute_fence(self):
        fence = torch.cuda.Event()
        fence.record(torch.cuda.current_stream(self.device))
        return fence

    def wait(self, fence) -> None:
        torch.cuda.current_stream(self.device).wait_event(fence)

    def synchronize(self) -> None:
        self.stream.synchronize()


class Fence:
    """A CPU fence: set once its work is done; ``error`` if that work failed."""

    def __init__(self, done: bool = False):
        self._event = threading.Event()
        self.error: BaseException | None = None
        if done:
            self._event.set()

    def set(self) -> None:
        self._event.set()

    def wait(self) -> None:
        self._event.wait()

    def is_set(self) -> bool:
        return self._event.is_set()


_PASSED = Fence(done=True)


def _work(jobs: "queue.SimpleQueue") -> None:
    """The CPU copy queue. Holds no reference to its ``ThreadCopier`` so that can be collected."""
    while True:
        job = jobs.get()
        if job is None:
            return
        dst, src, chunk_bytes, after, done, copy_fn = job
        try:
            if after is not None:
                after.wait()
                if after.error is not None:
                    raise RuntimeError("an earlier weight copy failed") from after.error
            for a, b in chunks(src.numel(), chunk_bytes):
                copy_fn(dst[a:b], src[a:b])
        except BaseException as exc:  # handed to whoever waits on the fence
            done.error = exc
        done.set()


class ThreadCopier(Copier):
    """CPU copy engine: one worker thread. ``copy_fn`` copies one chunk (tests slow it down)."""

    def __init__(self, copy_fn: CopyFn | None = None):
        self.copy_fn = copy_fn or _plain_copy
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_work, args=(self._jobs,), name="djinn-weight-copy", daemon=True)
        self._thread.start()
        self._closed = False
        weakref.finalize(self, self._jobs.put, None)

    def copy(self, dst, src, chunk_bytes, after):
        if self._closed:
            raise RuntimeError("copy engine is closed")
        done = Fence()
        self._jobs.put((dst, src, chunk_bytes, after, done, self.copy_fn))
        return done

    def compute_fence(self):
        return _PASSED  # CPU compute is synchronous: whatever was issued has finished

    def wait(self, fence) -> None:
        fence.wait()
        if fence.error is not None:
            raise RuntimeError(f"copying weights into the device ring failed: {fence.error}") from fence.error

    def synchronize(self) -> None:
        if self._closed:
            return
        marker = Fence()
        self._jobs.put((torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8), None, None, marker,
                        self.copy_fn))
        marker.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(None)


def copier_for(device: torch.device) -> Copier:
    device = torch.device(device)
    return CudaCopier(device) if device.type == "cuda" else ThreadCopier()
