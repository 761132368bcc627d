"""Continuous batching: every engine step runs one forward for all runnable turns.

A plain ``generate`` turn (no breakpoint, intervention or capture; not on a streamed model)
is handed to the ``Batcher`` once its memory is ready (``Engine._generate``). Each step, per
model, the batcher asks the scheduler (``engine/scheduler.py``) which turns run and how much
of each, reserves their blocks, has the model runner (``engine/runner.py``) execute the step
(a replayed step graph on CUDA where one fits), samples every finished prompt's next token
with one host sync, and advances the turns: stop rules, results.

The batcher never moves KV (the turn's blocks were reserved by
``Residency.begin_turn``) and finishes turns through the engine (``_complete_turn`` /
``_rollback_turn``), so a batched turn ends exactly like a serial one.
Invariant: a turn is in exactly one of: running here, finished (future resolved).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from djinn.engine.batch import BatchItem
from djinn.engine.runner import ModelRunner
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.engine.sampling import MIN_TEMPERATURE, Sampler, SamplingParams, stop_check
from djinn.engine.scheduler import plan_step
from djinn.errors import Cancelled


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
        self.runner = ModelRunner(self.max_batch + self.prefill_chunk_tokens, self.max_batch,
                                  self.prefill_chunk_tokens, cuda_graphs)
        self.running: list[Running] = []
        self.batch_sizes: Counter = Counter()      # decode+prefill items per step
        self.steps = 0
        # per kind of step (a step graph replayed, or an eager forward): count and wall seconds
        # (forward, sampling and advancing; the runner has the device time), and the device KV
        # blocks the stepped turns held (summed over steps: / steps / pool capacity is the share
        # of the pool doing work)
        self.step_kinds: Counter = Counter()
        self.step_s: Counter = Counter()
        self.stepped_blocks = 0

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
    @torch.inference_mode()
    def step(self) -> None:
        by_model: dict[str, list[Running]] = {}
        for r in self.running:
            by_model.setdefault(r.session.model, []).append(r)
        for model, turns in by_model.items():
            plan = plan_step(turns, self.max_batch, self.prefill_chunk_tokens)
            if plan:
                self._step_model(self.engine.runtime(model), plan)

    def _step_model(self, rt, plan: list[tuple[Running, list[int]]]) -> None:
        items = []
        for r, chunk in plan:
            s = r.session
            self.engine._ensure_blocks(s, rt, s.num_cached + len(chunk))
            items.append(BatchItem(block_table=list(s.block_table), start=s.num_cached, tokens=list(chunk)))
        t0 = time.perf_counter()
        try:
            logits, kind = self.runner.run(rt, items)
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

    def stats(self) -> dict:
        self.runner.read_events()
        return {"steps": self.steps, "running": len(self.running),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "steps_by_kind": dict(self.step_kinds), "step_s_by_kind": dict(self.step_s),
                "step_gpu_s_by_kind": dict(self.runner.step_gpu_s),
                "stepped_kv_blocks": self.stepped_blocks}
