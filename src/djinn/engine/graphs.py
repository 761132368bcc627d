"""CUDA graphs of decode steps, one per batch-size bucket.

A decode step of B sessions launches hundreds of small kernels; replaying a captured graph
removes their launch cost (and Python's). Captured per bucket (1, 2, 4, 8, ...): a step of B
sessions replays the smallest bucket >= B with the spare rows padded. What a graph captures
is the model's own code from the embeddings to the final norm, with Djinn's batch cache and
paged attention inside; the LM head, logits and sampling run outside, eagerly, on the real
rows only (sampling parameters differ per session and stay out of the graph).

Static state, shared by all buckets and updated in place before each replay: token ids,
positions and block tables (``[max_batch, ceil(max_context / block_size)]``, int32). Invariants:
- padded rows have token 0, position 0 and a table of ``BlockPool.NULL_BLOCK`` only: they
  write and read one slot of the reserved null block, attend to exactly one key (no 0/0 NaN)
  and never touch a session's blocks;
- a whole table row is rewritten at each replay (no stale columns from an earlier session);
- before a warm-up or capture the static buffers are reset to the padded state, so the
  throw-away runs of a capture write only into the null block;
- the host staging buffers are pinned and not rewritten until the previous upload finished.
"""

from __future__ import annotations

import torch

from djinn.attention import AttentionBackend, backend_for
from djinn.attention.base import derive
from djinn.engine.batch import BatchItem, _enter, batched_mode
from djinn.memory.blocks import BlockPool

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)


class DecodeGraphs:
    """Captured decode steps of one model over one pool."""

    def __init__(self, executor, pool: BlockPool, max_context: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 backend: AttentionBackend | None = None):
        if pool.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA pool")
        self.executor = executor
        self.pool = pool
        self.backend = backend or backend_for(pool.device)
        if not self.backend.graph_safe:
            raise RuntimeError(f"attention backend {self.backend.name!r} cannot run inside a CUDA graph")
        self.buckets = tuple(sorted(set(buckets)))
        self.block_size = pool.shape.block_size
        self.width = -(-max_context // self.block_size)
        self.max_context = self.width * self.block_size
        dev = pool.device
        top = self.buckets[-1]
        self._ids = torch.zeros(top, dtype=torch.long, device=dev)
        self._pos = torch.zeros(top, dtype=torch.long, device=dev)
        self._tables = torch.zeros(top, self.width, dtype=torch.int32, device=dev)
        self._seq = torch.arange(top, dtype=torch.int32, device=dev)
        self._h_ids = torch.zeros(top, dtype=torch.long, pin_memory=True)
        self._h_pos = torch.zeros(top, dtype=torch.long, pin_memory=True)
        self._h_tables = torch.zeros(top, self.width, dtype=torch.int32, pin_memory=True)
        self._uploaded: torch.cuda.Event | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None

    # ---- capture --------------------------------------------------------------------
    def _body(self, b: int) -> torch.Tensor:
        """One decode step of ``b`` rows from the static buffers; final-normed hidden [b, hidden]."""
        meta = derive(self.block_size, self._seq[:b], self._pos[:b], self._tables[:b], spans=None, decode_only=True)
        ex = self.executor
        h, args, kwargs = _enter(ex, self.pool, self.backend, meta, self._ids[:b][None])
        with batched_mode(ex, self.pool.device):
            for layer in ex.arch.layers:
                out = layer(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
            if ex.arch.final_norm is not None:
                h = ex.arch.final_norm(h)
        return h[0]

    def _reset_static(self) -> None:
        self._ids.zero_()
        self._pos.zero_()
        self._tables.zero_()

    @torch.inference_mode()
    def capture(self, sizes: tuple[int, ...] | None = None) -> None:
        """Capture the buckets ``sizes`` (default: all), largest first so smaller ones reuse
        the shared memory pool."""
        sizes = tuple(sorted(set(sizes or self.buckets), reverse=True))
        for b in sizes:
            if b not in self.buckets:
                raise ValueError(f"{b} is not a bucket of {self.buckets}")
            if b in self._graphs:
                continue
            self._wait_upload()
            self._reset_static()
            side = torch.cuda.Stream(self.pool.device)
            side.wait_stream(torch.cuda.current_stream(self.pool.device))
            with torch.cuda.stream(side):
                for _ in range(2):   # compile Triton kernels, let cuBLAS pick its algorithms
                    self._body(b)
            torch.cuda.current_stream(self.pool.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (a client waiting on a copy event, the pager) may keep
            # calling CUDA while this one captures; "global" would fail their calls
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                out = self._body(b)
            if self._mempool is None:
                self._mempool = graph.pool()
            self._graphs[b] = (graph, out)

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    # ---- replay ---------------------------------------------------------------------
    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n and b in self._graphs), None)

    def accepts(self, items: list[BatchItem]) -> bool:
        """A step this object can replay: decodes only, no hooks, within the captured sizes."""
        if not items or self.bucket_for(len(items)) is None:
            return False
        return all(len(it.tokens) == 1 and it.hook is None and it.start + 1 <= self.max_context for it in items)

    def _wait_upload(self) -> None:
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def run(self, items: list[BatchItem]) -> list[torch.Tensor]:
        """Replay one decode step; float logits [1, vocab] per item."""
        if not self.accepts(items):
            raise RuntimeError("this step is not a graph-replayable decode step (see DecodeGraphs.accepts)")
        n = len(items)
        b = self.bucket_for(n)
        bs = self.block_size
        self._wait_upload()   # the pinned staging buffers may still be in flight
        ids, pos, tables = self._h_ids.numpy(), self._h_pos.numpy(), self._h_tables.numpy()
        for i, it in enumerate(items):
            need = it.start // bs + 1
            if len(it.block_table) < need or 0 in it.block_table[:need]:
                raise RuntimeError(f"item {i}: its block table must hold position {it.start} outside the null block")
            ids[i] = it.tokens[0]
            pos[i] = it.start
            tables[i, :need] = it.block_table[:need]
            tables[i, need:] = 0
        ids[n:b] = 0
        pos[n:b] = 0
        tables[n:b] = 0
        with torch.inference_mode():
            self._ids[:b].copy_(self._h_ids[:b], non_blocking=True)
            self._pos[:b].copy_(self._h_pos[:b], non_blocking=True)
            self._tables[:b].copy_(self._h_tables[:b], non_blocking=True)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
            graph, out = self._graphs[b]
            graph.replay()
            logits = self.executor.arch.lm_head(out[:n])
        return list(logits.float().split(1))
