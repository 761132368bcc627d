"""Continuous batching: every engine step runs one forward for all runnable turns.

A plain ``generate`` turn (no breakpoint, intervention or capture; not on a streamed model)
is handed to the ``Batcher`` once its memory is ready (``Engine._generate``). Each step then
packs, per model:
- the decode token of every turn that is generating (one token each), and
- prefill chunks of turns whose prompt is not yet computed, under a token budget
  (``EngineConfig.prefill_chunk_tokens``), so a long prompt never stalls the others' decodes.
Turns are served oldest session first, so a session that comes back from a tool call keeps its
place ahead of sessions that arrived after it. On CUDA a step replays a captured graph
(``engine/graphs.py``: decode rows and prefill chunks alike, by the step's token count); a step
that fits no bucket runs eagerly, and ``stats()`` counts each kind.

The batcher only decides and advances; it never moves KV (the turn's blocks were reserved by
``Residency.begin_turn``) and finishes turns through the engine (``_complete_turn`` /
``_rollback_turn``), so a batched turn ends exactly like a serial one.
Invariant: a turn is in exactly one of: running here, finished (future resolved).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from djinn.engine.batch import BatchItem, forward_batch
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.engine.sampling import MIN_TEMPERATURE, Sampler, SamplingParams, stop_check
from djinn.errors import Cancelled

log = logging.getLogger("djinn.engine")


@dataclass(eq=False)
class Running:
    """One batched turn between steps."""

    turn: object                      # engine._Turn
    params: SamplingParams
    request: GenerateRequest
    sampler: Sampler
    stop_ids: set[int]
    future: Future = field(default_factory=Future)
    out: list[int] = field(default_factory=list)
    computed: int = 0
    text: str | None = None
    t_first: float | None = None

    @property
    def session(self):
        return self.turn.session

    @property
    def pending(self) -> int:
        s = self.session
        return len(s.tokens) - s.num_cached


class Batcher:
    def __init__(self, engine, prefill_chunk_tokens: int = 512, max_batch: int = 64, cuda_graphs: bool = True):
        self.engine = engine
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self.max_batch = max(1, max_batch)
        self.cuda_graphs = cuda_graphs
        self.running: list[Running] = []
        self.batch_sizes: Counter = Counter()      # decode+prefill items per step
        self.steps = 0
        # per kind of step (a decode graph replayed, or an eager forward): count and seconds
        # (forward and sampling), and the device KV blocks the stepped turns held (summed over
        # steps: / steps / pool capacity is the share of the pool doing work)
        self.step_kinds: Counter = Counter()
        self.step_s: Counter = Counter()
        self.step_gpu_s: Counter = Counter()       # CUDA: the forward's own time on the device
        self._timed: list = []                     # (kind, start, end) events not read yet
        self.stepped_blocks = 0
        self._graphs: dict[str, object] = {}       # model -> StepGraphs (or None when unavailable)

    # ---- entering and leaving ----------------------------------------------------------
    def add(self, turn, params: SamplingParams, request: GenerateRequest) -> Future:
        rt = turn.runtime
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(rt.eos_ids()))
        r = Running(turn=turn, params=params, request=request, sampler=Sampler(params, rt.device), stop_ids=stop_ids)
        self.running.append(r)
        return r.future

    def has_work(self) -> bool:
        return bool(self.running)

    def cancel_session(self, session, exc: BaseException) -> None:
        """End the running turn of ``session`` (closing, shutting down) with ``exc``."""
        for r in [r for r in self.running if r.session is session]:
            self._fail(r, exc)

    def cancel_all(self) -> None:
        for r in list(self.running):
            self._fail(r, Cancelled("the engine is shutting down"))

    def _fail(self, r: Running, exc: BaseException) -> None:
        if r in self.running:
            self.running.remove(r)
        try:
            self.engine._rollback_turn(r.turn)
        finally:
            if not r.future.done():
                r.future.set_exception(exc)

    # ---- one step ----------------------------------------------------------------------
    def _plan(self, turns: list[Running]) -> list[tuple[Running, list[int]]]:
        """Decodes first (one token each), then prefill chunks under the token budget."""
        turns = sorted(turns, key=lambda r: r.session.created_at)
        plan = [(r, r.session.tokens[-1:]) for r in turns if r.pending == 1][: self.max_batch]
        budget = self.prefill_chunk_tokens
        for r in turns:
            if r.pending > 1 and budget > 0 and len(plan) < self.max_batch:
                s = r.session
                chunk = s.tokens[s.num_cached: s.num_cached + min(r.pending, budget)]
                plan.append((r, chunk))
                budget -= len(chunk)
        return plan

    @property
    def max_step_tokens(self) -> int:
        """The most new tokens one step can hold: every decode plus a full prefill budget."""
        return self.max_batch + self.prefill_chunk_tokens

    def _graphs_for(self, rt, n: int):
        """The model's step graphs with a bucket for ``n`` tokens captured, or None (eager)."""
        if not self.cuda_graphs or rt.device.type != "cuda" or rt.streamer is not None:
            return None
        graphs = self._graphs.get(rt.name, False)
        if graphs is False:
            try:
                from djinn.engine.graphs import StepGraphs, buckets_up_to

                graphs = StepGraphs(rt.executor, rt.pool, rt.max_context, buckets_up_to(self.max_step_tokens),
                                    max_seqs=self.max_batch)
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
        graphs = self._graphs_for(rt, 1)
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

    @torch.inference_mode()
    def step(self) -> None:
        by_model: dict[str, list[Running]] = {}
        for r in self.running:
            by_model.setdefault(r.session.model, []).append(r)
        for model, turns in by_model.items():
            plan = self._plan(turns)
            if plan:
                self._step_model(self.engine.runtime(model), plan)

    def _step_model(self, rt, plan: list[tuple[Running, list[int]]]) -> None:
        items = []
        for r, chunk in plan:
            s = r.session
            self.engine._ensure_blocks(s, rt, s.num_cached + len(chunk))
            items.append(BatchItem(block_table=list(s.block_table), start=s.num_cached, tokens=list(chunk)))
        graphs = self._graphs_for(rt, sum(len(it.tokens) for it in items))
        kind = "graph" if graphs is not None and graphs.accepts(items) else "eager"
        t0 = time.perf_counter()
        events = None
        if rt.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        try:
            logits = forward_batch(rt.executor, rt.pool, items, graphs=graphs)
            if events is not None:
                events[1].record()
        except BaseException as exc:
            for r, _ in plan:
                self._fail(r, exc)
            return
        self.steps += 1
        self.batch_sizes[len(items)] += 1
        self.stepped_blocks += sum(len(it.block_table) for it in items)
        picks = self._sample(plan, logits)
        for i, (r, chunk) in enumerate(plan):
            if r not in self.running:      # its sampling failed (a logits processor raised)
                continue
            try:
                self._advance(rt, r, chunk, picks.get(i))
            except BaseException as exc:   # a callback of this turn failed: only this turn ends
                self._fail(r, exc)
        self.step_kinds[kind] += 1
        self.step_s[kind] += time.perf_counter() - t0
        if events is not None:
            self._timed.append((kind, *events))
            self._read_events()

    def _sample(self, plan: list[tuple[Running, list[int]]], logits: list[torch.Tensor]) -> dict[int, int]:
        """The next token of every turn whose prompt this step completes, by plan index, with one
        host sync for the whole step: greedy rows are one argmax over their stacked logits,
        sampled rows use their own request's generator (seeded runs repeat), and a request's
        logits processor sees its row first. A processor that raises fails only its turn."""
        greedy, rows, order = [], [], []
        for i, ((r, chunk), lg) in enumerate(zip(plan, logits)):
            if r.pending != len(chunk):
                continue                      # more of the prompt to compute after this step
            last = lg[-1:]
            try:
                if r.request.logits_processor is not None:
                    last = r.request.logits_processor(r.out, last)
                if r.params.greedy or r.params.temperature < MIN_TEMPERATURE:
                    greedy.append((i, last))
                else:
                    rows.append(r.sampler(last))
                    order.append(i)
            except BaseException as exc:
                self._fail(r, exc)
        if greedy:
            rows.append(torch.cat([lg for _, lg in greedy]).argmax(dim=-1))
            order.extend(i for i, _ in greedy)
        if not rows:
            return {}
        return dict(zip(order, torch.cat(rows).tolist()))

    def _advance(self, rt, r: Running, chunk: list[int], nxt: int | None) -> None:
        """Account this step's chunk of ``r``; ``nxt``: its sampled token, if its prompt is done."""
        s = r.session
        s.num_cached += len(chunk)
        r.computed += len(chunk)
        memory = r.turn.memory
        if "rebuild_to" in memory and "recompute_ms" not in memory and s.num_cached >= memory["rebuild_to"]:
            memory["recompute_ms"] = (time.perf_counter() - r.turn.started) * 1e3   # the dropped prefix is back
        if nxt is None:
            return                        # more of the prompt to compute
        if r.t_first is None:
            r.t_first = time.perf_counter()
        r.out.append(nxt)
        s.tokens.append(nxt)
        if r.request.on_token is not None:
            r.request.on_token(nxt)
        finish, cut = stop_check(r.out, r.stop_ids, r.params, rt.tokenizer, len(s.tokens), rt.max_context)
        if cut is not None:
            r.text = cut
        if finish is not None:
            self._finish(rt, r, finish)

    def _finish(self, rt, r: Running, finish: str) -> None:
        self.running.remove(r)
        s = r.session
        end = time.perf_counter()
        s.ended_with_eos = finish == "stop" and r.out[-1] in r.stop_ids
        s.tokens_computed += r.computed
        self.engine.counters["tokens_computed"] += r.computed
        text = r.text if r.text is not None else rt.tokenizer.decode(r.out, skip_special_tokens=True)
        started = r.turn.started
        result = GenerateResult(
            token_ids=r.out, text=text, finish_reason=finish, prompt_tokens=0, cached_tokens=0,
            computed_tokens=r.computed,
            timings={"prefill_ms": (r.t_first - started) * 1e3, "decode_ms": (end - r.t_first) * 1e3,
                     "compute_ms": (end - started) * 1e3},
        )
        try:
            result = self.engine._complete_turn(r.turn, result)
        except BaseException as exc:
            r.future.set_exception(exc)
            return
        r.future.set_result(result)

    def _read_events(self) -> None:
        """Add up the device time of the steps whose forward is done (no sync: a step that
        samples nothing leaves its forward in flight)."""
        while self._timed and self._timed[0][2].query():
            kind, start, end = self._timed.pop(0)
            self.step_gpu_s[kind] += start.elapsed_time(end) / 1e3

    def stats(self) -> dict:
        self._read_events()
        return {"steps": self.steps, "running": len(self.running),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "steps_by_kind": dict(self.step_kinds), "step_s_by_kind": dict(self.step_s),
                "step_gpu_s_by_kind": dict(self.step_gpu_s),
                "stepped_kv_blocks": self.stepped_blocks}
