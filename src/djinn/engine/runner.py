"""The model runner: executes the step the scheduler planned, and nothing else.

A step is a list of ``BatchItem``s (``engine/batch.py``). On CUDA it replays the model's step
graph for its token count (``engine/graphs.py``) when one fits, else it runs eagerly; the
runner captures the graphs (all buckets at load, with ``warmup``), runs the eager shapes once
at load so their first kernels' start-up never lands on a turn, and measures each step's
device time by kind (CUDA events, read without a sync once the step is done). It never
decides what runs and never touches sessions or their memory.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch

from djinn.engine.batch import BatchItem, forward_batch

log = logging.getLogger("djinn.engine")


class ModelRunner:
    def __init__(self, max_step_tokens: int, max_seqs: int, prefill_chunk_tokens: int, cuda_graphs: bool = True):
        self.max_step_tokens = max_step_tokens        # the most new tokens one step can hold
        self.max_seqs = max_seqs
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[str, object] = {}       # model -> StepGraphs (or None when unavailable)
        self.step_gpu_s: Counter = Counter()       # CUDA: each kind's forwards' own time on the device
        self._timed: list = []                     # (kind, start, end) events not read yet

    def run(self, rt, items: list[BatchItem]) -> tuple[list[torch.Tensor], str]:
        """One forward of ``items``: logits per item and the step's kind (``graph`` or ``eager``)."""
        graphs = self.graphs_for(rt, sum(len(it.tokens) for it in items))
        kind = "graph" if graphs is not None and graphs.accepts(items) else "eager"
        events = None
        if rt.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        logits = forward_batch(rt.executor, rt.pool, items, graphs=graphs)
        if events is not None:
            events[1].record()
            self._timed.append((kind, *events))
            self.read_events()
        return logits, kind

    def read_events(self) -> None:
        """Add up the device time of the steps whose forward is done (no sync: a step that
        samples nothing leaves its forward in flight)."""
        while self._timed and self._timed[0][2].query():
            kind, start, end = self._timed.pop(0)
            self.step_gpu_s[kind] += start.elapsed_time(end) / 1e3

    def graphs_for(self, rt, n: int):
        """The model's step graphs with a bucket for ``n`` tokens captured, or None (eager)."""
        if not self.cuda_graphs or rt.device.type != "cuda" or rt.streamer is not None:
            return None
        graphs = self._graphs.get(rt.name, False)
        if graphs is False:
            try:
                from djinn.engine.graphs import StepGraphs, buckets_up_to

                graphs = StepGraphs(rt.executor, rt.pool, rt.max_context, buckets_up_to(self.max_step_tokens),
                                    max_seqs=self.max_seqs)
            except Exception as exc:  # e.g. no Triton
                log.warning("CUDA graphs off for %s: %s", rt.name, exc)
                graphs = None
            self._graphs[rt.name] = graphs
        if graphs is None:
            return None
        bucket = next((b for b in graphs.buckets if b >= n), None)
        if bucket is None:
            return None
        if bucket not in graphs.captured and not self._capture(rt, graphs, (bucket,)):
            return None
        return graphs

    def _capture(self, rt, graphs, sizes: tuple[int, ...], progress=None) -> bool:
        """Capture ``sizes``; on failure the model runs eagerly from now on (False)."""
        try:
            graphs.capture(sizes, progress)
            return True
        except Exception as exc:
            log.warning("CUDA graph capture of batches %s failed for %s, running eagerly: %s", sizes, rt.name, exc)
            self._graphs[rt.name] = None
            return False

    @torch.inference_mode()
    def warmup(self, rt) -> dict:
        """Load every kernel the steps will use now (CUDA only; on the loop): capture every
        step-graph bucket up to ``max_step_tokens`` (a lazily captured bucket costs the turn that
        first needs it a capture and, in a fresh process, the Triton compiles), then run the
        eager step shapes once (``warm_eager``: steps with hooks, or of no bucket). Returns the
        seconds each part took."""
        took: dict = {}
        if rt.streamer is not None or rt.device.type != "cuda":   # streamed weights run layer by layer
            return took
        t = time.perf_counter()
        graphs = self.graphs_for(rt, 1)
        if graphs is not None:
            sizes = graphs.buckets
            log.info("capturing %d step graphs of %s (buckets of %s tokens)", len(sizes), rt.name,
                     ",".join(map(str, sizes)))
            done = []

            def progress(b: int) -> None:
                done.append(b)
                if len(done) % 4 == 0 or len(done) == len(sizes):
                    log.info("  %d/%d step graphs captured (%.1f s)", len(done), len(sizes), time.perf_counter() - t)

            if self._capture(rt, graphs, sizes, progress):
                took["graph_capture_s"] = round(time.perf_counter() - t, 2)
                log.info("captured step graphs of %s in %.1f s", rt.name, took["graph_capture_s"])
        t = time.perf_counter()
        if self.warm_eager(rt):
            took["eager_warmup_s"] = round(time.perf_counter() - t, 2)
        return took

    @torch.inference_mode()
    def warm_eager(self, rt) -> bool:
        """One eager forward of each step shape the graphs do not cover, on scratch blocks that
        are released after: prefill chunks from position 0 (causal SDPA) and after a cached
        context (SDPA with a mask), each at an even and an odd length, and decode rows mixed with
        a chunk. Why: the first call of a kernel in a process lands on whichever turn needs it
        first; on the H200 (torch 2.11, CUDA 13) those of cuDNN's attention took 0.7-0.85 s each
        (``attention/reference.py`` now leaves cuDNN out; the memory-efficient kernel's first call
        took 12 ms). Returns False when the pool or the context window is too small for the
        shapes (nothing is run then)."""
        c = min(self.prefill_chunk_tokens, 512)
        shapes = [(0, c), (0, 37), (c, c), (c + 5, 45)]                     # (start, new tokens)
        mixed = [(100, 1), (200, 1), (301, 1), (400, 20)]
        need = max(s + n for s, n in shapes + mixed)
        bs = rt.pool.shape.block_size
        blocks = -(-need // bs)
        if need > rt.max_context or blocks > rt.pool.free_count:
            log.info("eager warm-up of %s skipped: it needs %d tokens of context and %d free blocks",
                     rt.name, need, blocks)
            return False
        t = time.perf_counter()
        table = rt.pool.allocate(blocks)
        try:
            for s, n in shapes:
                forward_batch(rt.executor, rt.pool, [BatchItem(block_table=table, start=s, tokens=[0] * n)])
            forward_batch(rt.executor, rt.pool, [BatchItem(block_table=table, start=s, tokens=[0] * n)
                                                 for s, n in mixed])
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
        finally:
            rt.pool.release(table)
        log.info("eager warm-up of %s in %.1f s", rt.name, time.perf_counter() - t)
        return True
