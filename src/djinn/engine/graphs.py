"""CUDA graphs of batch steps (decode rows and prefill chunks together), one per token bucket.

An eager step of a 7B model launches ~1,000 kernels; on a slow host their launch cost, not the
GPU, set the step's time (a step of 7 decodes + a 65-token chunk: 37 ms eager on one H200 host
against ~6 ms for a replayed decode graph). So every step whose shape fits a bucket replays a
graph: a step of T new tokens (any mix of decode rows and prefill chunks, from at most
``max_seqs`` sessions) replays the smallest captured bucket >= T, its spare rows padded.

What a graph captures is the model's own code from the embeddings to the final norm, with
Djinn's batch cache inside and attention through fixed-size launches of the paged kernels
(``attention/graph_step.py``): the decode kernel over ``decode_slots(T)`` query rows (decode
rows and the rows of chunks of at most ``SMALL_CHUNK`` tokens) and the prefill kernel over
``tile_slots(T)`` tiles (rows of larger chunks, up to ``PREFILL_BLOCK_M`` a tile). Spare slots
are padding the kernels skip. The LM head, logits and sampling run outside, eagerly, on the
rows that need logits only (sampling parameters differ per session and stay out of the graph).

Static state, shared by all buckets and updated in place before each replay, is one int32
device buffer (one upload per step) holding, in order: token ids, positions and table rows
of the step's tokens, the decode slots (row, table row, keys), the tiles (table row, first
row, rows, first position), and the block tables (``[max_seqs + 1, ceil(max_context / bs)]``).
Invariants:
- padded token rows have token 0, position 0 and table row ``max_seqs``, which is all
  ``BlockPool.NULL_BLOCK`` and never rewritten: they write one slot of the reserved null
  block and never touch a session's blocks; their attention output is 0 (no slot reads them);
- padded decode slots have 0 keys and padded tiles 0 rows: the kernels store nothing for them;
- the table rows of the step's sessions are rewritten whole at each replay (no stale columns);
- before a warm-up or capture the static buffer is reset to the padded state, so the
  throw-away runs of a capture write only into the null block;
- the pinned staging buffer is not rewritten until the previous upload finished.

On a CPU pool nothing is captured: ``run`` executes the same body from the same static buffer
eagerly (with Triton's interpreter), which is how the layout is tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from djinn.attention.base import derive
from djinn.attention.graph_step import StaticStep, StaticStepBackend
from djinn.attention.triton_paged import PREFILL_BLOCK_M, SMALL_CHUNK
from djinn.engine.batch import BatchItem, _enter, batched_mode
from djinn.memory.blocks import BlockPool

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)
# steps with prefill chunks: a step of T tokens pays for its bucket's rows in every matmul, so
# the buckets are finer than powers of two (the largest step is max_batch + the prefill budget)
MIXED_BUCKETS = (80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 576, 640)
DEFAULT_BUCKETS = DECODE_BUCKETS + MIXED_BUCKETS


def buckets_up_to(tokens: int) -> tuple[int, ...]:
    """The default buckets a step of at most ``tokens`` new tokens needs (the first one that
    covers ``tokens`` included)."""
    out = []
    for b in DEFAULT_BUCKETS:
        out.append(b)
        if b >= tokens:
            break
    return tuple(out)


def decode_slots(bucket: int, max_seqs: int) -> int:
    """Query rows the decode kernel is launched over in ``bucket``: every row of a small bucket,
    at most two per session in a large one (a spare slot is a program that returns at once,
    but tens of thousands of them cost ~1 ms a step)."""
    return min(bucket, 2 * max_seqs)


def tile_slots(bucket: int, max_seqs: int) -> int:
    """Prefill tiles the prefill kernel is launched over: enough for any step of ``bucket``
    tokens from ``max_seqs`` sessions. Chunks go to tiles when they are longer than
    ``SMALL_CHUNK`` (at most ``bucket // (SMALL_CHUNK + 1)`` of them) or, in a bucket with
    fewer decode slots than rows, when the slots are full (at most one chunk per session)."""
    if bucket <= decode_slots(bucket, max_seqs):
        chunks = bucket // (SMALL_CHUNK + 1)
    else:
        chunks = max_seqs
    return bucket // PREFILL_BLOCK_M + min(chunks, max_seqs)


@dataclass
class _Offsets:
    """Where each field lives in the packed int32 buffer (``top`` = the largest bucket)."""

    top: int
    dec: int
    tiles: int
    seqs: int
    width: int

    @property
    def ids(self) -> int:
        return 0

    @property
    def pos(self) -> int:
        return self.top

    @property
    def seq(self) -> int:
        return 2 * self.top

    @property
    def dec_rows(self) -> int:
        return 3 * self.top

    @property
    def dec_seq(self) -> int:
        return self.dec_rows + self.dec

    @property
    def dec_len(self) -> int:
        return self.dec_seq + self.dec

    @property
    def tile(self) -> int:
        return self.dec_len + self.dec

    @property
    def tables(self) -> int:
        return self.tile + 4 * self.tiles

    def size(self) -> int:
        return self.tables + (self.seqs + 1) * self.width


class StepGraphs:
    """Captured batch steps of one model over one pool."""

    def __init__(self, executor, pool: BlockPool, max_context: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 max_seqs: int = 64):
        self.executor = executor
        self.pool = pool
        self.backend = StaticStepBackend()
        self.buckets = tuple(sorted(set(buckets)))
        self.max_seqs = max_seqs
        self.block_size = pool.shape.block_size
        self.width = -(-max_context // self.block_size)
        self.max_context = self.width * self.block_size
        top = self.buckets[-1]
        self._o = _Offsets(top=top, dec=decode_slots(top, max_seqs), tiles=tile_slots(top, max_seqs),
                           seqs=max_seqs, width=self.width)
        dev = pool.device
        self._buf = torch.zeros(self._o.size(), dtype=torch.int32, device=dev)
        self._cuda = dev.type == "cuda"
        self._host = torch.zeros(self._o.size(), dtype=torch.int32, pin_memory=self._cuda)
        self._uploaded: torch.cuda.Event | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor] | None] = {}
        self._mempool = None

    # ---- static views --------------------------------------------------------------------
    def _view(self, start: int, n: int) -> torch.Tensor:
        return self._buf[start:start + n]

    def _step_view(self, b: int) -> StaticStep:
        o, nd, nt = self._o, decode_slots(b, self.max_seqs), tile_slots(b, self.max_seqs)
        return StaticStep(
            rows=self._view(o.dec_rows, nd), seqs=self._view(o.dec_seq, nd), kv_lens=self._view(o.dec_len, nd),
            tiles=self._view(o.tile, 4 * nt).view(nt, 4),
            # the decode launch (DECODE_TABLE) is a shape, fixed per graph: tuned for every row of
            # a decode bucket, and for ~8 decode rows (an agents step's usual count) beside the
            # chunks of a larger bucket; spare slots' programs return at once
            expected_rows=b if b <= DECODE_BUCKETS[-1] else 8)

    # ---- capture --------------------------------------------------------------------
    def _body(self, b: int) -> torch.Tensor:
        """One step of ``b`` rows from the static buffer; final-normed hidden [b, hidden]."""
        o = self._o
        tables = self._buf[o.tables:o.tables + (o.seqs + 1) * o.width].view(o.seqs + 1, o.width)
        meta = derive(self.block_size, self._view(o.seq, b), self._view(o.pos, b).long(), tables)
        meta.extra["static"] = self._step_view(b)
        ex = self.executor
        h, args, kwargs = _enter(ex, self.pool, self.backend, meta, self._view(o.ids, b).long()[None])
        with batched_mode(ex, self.pool.device):
            for layer in ex.arch.layers:
                out = layer(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
            if ex.arch.final_norm is not None:
                h = ex.arch.final_norm(h)
        return h[0]

    def _padded(self) -> np.ndarray:
        """The host buffer in the padded state (also the state every replay starts from)."""
        o, a = self._o, self._host.numpy()
        a[:o.tables] = 0
        a[o.seq:o.seq + o.top] = o.seqs                   # padded rows: the null table row
        a[o.dec_seq:o.dec_seq + o.dec] = o.seqs
        a[o.tile:o.tile + 4 * o.tiles:4] = o.seqs
        return a

    def _reset_static(self) -> None:
        self._wait_upload()
        a = self._padded()
        a[self._o.tables:] = 0
        self._buf.copy_(self._host)
        if self._cuda:
            torch.cuda.current_stream(self.pool.device).synchronize()

    @torch.inference_mode()
    def capture(self, sizes: tuple[int, ...] | None = None, progress=None) -> None:
        """Capture the buckets ``sizes`` (default: all), largest first so smaller ones reuse
        the shared memory pool. ``progress(bucket)`` is called after each capture."""
        sizes = tuple(sorted(set(sizes or self.buckets), reverse=True))
        for b in sizes:
            if b not in self.buckets:
                raise ValueError(f"{b} is not a bucket of {self.buckets}")
            if b in self._graphs:
                continue
            self._reset_static()
            if not self._cuda:
                self._graphs[b] = None   # run() executes the body eagerly
                continue
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
            if progress is not None:
                progress(b)

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    # ---- replay ---------------------------------------------------------------------
    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n and b in self._graphs), None)

    def layout(self, items: list[BatchItem]) -> tuple[int, list, list] | None:
        """How a step of ``items`` fits a captured bucket: (bucket, decode slots as (row, item),
        tiles as (item, first row, rows, first position)); None if it does not fit (then the
        step runs eagerly)."""
        if not items or len(items) > self.max_seqs:
            return None
        total = sum(len(it.tokens) for it in items)
        b = self.bucket_for(total)
        if b is None:
            return None
        nd, nt = decode_slots(b, self.max_seqs), tile_slots(b, self.max_seqs)
        dec, tiles, row = [], [], 0
        for i, it in enumerate(items):
            n = len(it.tokens)
            if it.hook is not None or it.all_logits or it.start + n > self.max_context:
                return None
            if n <= SMALL_CHUNK and len(dec) + n <= nd:
                dec.extend((row + k, i) for k in range(n))
            else:
                tiles.extend((i, row + off, min(PREFILL_BLOCK_M, n - off), it.start + off)
                             for off in range(0, n, PREFILL_BLOCK_M))
            row += n
        if len(tiles) > nt:
            return None
        return b, dec, tiles

    def accepts(self, items: list[BatchItem]) -> bool:
        """A step this object can replay: no hooks, no all-row logits, within the captured sizes."""
        return self.layout(items) is not None

    def _wait_upload(self) -> None:
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def run(self, items: list[BatchItem]) -> list[torch.Tensor]:
        """Replay one step; float logits [1, vocab] per item (its last new token's)."""
        plan = self.layout(items)
        if plan is None:
            raise RuntimeError("this step does not fit a captured bucket (see StepGraphs.layout)")
        b, dec, tiles = plan
        o, bs = self._o, self.block_size
        self._wait_upload()   # the pinned staging buffer may still be in flight
        a = self._padded()
        tables = a[o.tables:o.tables + o.seqs * o.width].reshape(o.seqs, o.width)
        row, last = 0, []
        for i, it in enumerate(items):
            n = len(it.tokens)
            need = -(-(it.start + n) // bs)
            if len(it.block_table) < need or 0 in it.block_table[:need]:
                raise RuntimeError(f"item {i}: its block table must hold positions {it.start}..{it.start + n - 1} "
                                   "outside the null block")
            a[o.ids + row:o.ids + row + n] = it.tokens
            a[o.pos + row:o.pos + row + n] = np.arange(it.start, it.start + n)
            a[o.seq + row:o.seq + row + n] = i
            tables[i, :need] = it.block_table[:need]
            tables[i, need:] = 0
            row += n
            last.append(row - 1)
        if dec:
            d = np.asarray(dec, dtype=np.int32)
            a[o.dec_rows:o.dec_rows + len(d)] = d[:, 0]
            a[o.dec_seq:o.dec_seq + len(d)] = d[:, 1]
            a[o.dec_len:o.dec_len + len(d)] = a[o.pos + d[:, 0]] + 1
        if tiles:
            a[o.tile:o.tile + 4 * len(tiles)] = np.asarray(tiles, dtype=np.int32).reshape(-1)
        used = o.tables + len(items) * o.width
        with torch.inference_mode():
            dev = self.pool.device
            self._buf[:used].copy_(self._host[:used], non_blocking=True)
            idx = torch.tensor(last, dtype=torch.long).to(dev, non_blocking=True)
            if self._cuda:
                self._uploaded = torch.cuda.Event()
                self._uploaded.record()
                graph, out = self._graphs[b]
                graph.replay()
            else:
                out = self._body(b)
            logits = self.executor.arch.lm_head(out.index_select(0, idx))
        return list(logits.float().split(1))
