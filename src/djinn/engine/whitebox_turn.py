"""A generate call with interventions, captures or a breakpoint: the decode loop as an
object, so it can stop at layer N of step k and continue later from the same state.

Step 0 is the prefill (the forward over the turn's new tokens), step k the k-th decode step.
Every step runs the request's :class:`~djinn.engine.interventions.LayerPlan` hook after each
decoder layer. At the breakpoint the step stops after its layer; ``resume`` runs the step's
remaining layers and the head, then the rest of the generation. Steps run on the plain path's
numerics (engine/whitebox_step.py): where plain turns are batched, a prefill longer than
``prefill_chunk_tokens`` runs in chunks of that size as a plain turn's does, except the step
that pauses, which runs whole (its activation covers every token of the step). Sampling,
stop rules and the session's bookkeeping are those of a plain turn; the plain path keeps its
own loop so requests without white-box parts pay nothing for this.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from djinn.engine.interventions import LayerPlan
from djinn.engine.requests import GenerateResult
from djinn.engine.sampling import Sampler, SamplingParams, stop_check
from djinn.engine.whitebox_step import Step, chunk_tokens, open_step

if TYPE_CHECKING:  # pragma: no cover
    from djinn.engine.engine import _Turn
    from djinn.engine.whitebox import WhiteBox


class WhiteboxTurn:
    def __init__(self, wb: "WhiteBox", turn: "_Turn", params: SamplingParams, plan: LayerPlan,
                 breakpoint: tuple[int, int] | None):
        self.wb, self.turn, self.params, self.plan, self.breakpoint = wb, turn, params, plan, breakpoint
        self.s, self.rt = turn.session, turn.runtime
        self.sampler = Sampler(params, self.rt.device)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.rt.eos_ids()))
        self.out: list[int] = []
        self.step = 0
        self.computed = 0
        self.finish_reason = "length"
        self.text: str | None = None
        self.t_prefill: float | None = None
        self.paused_s = 0.0          # wall time spent paused, kept out of compute_ms
        self._paused_at = 0.0

    @torch.inference_mode()
    def run(self) -> GenerateResult:
        """Run steps until the generation ends or reaches its breakpoint (which returns a
        result with ``finish_reason="breakpoint"`` and ``paused`` set)."""
        s, rt = self.s, self.rt
        chunk = chunk_tokens(self.wb.engine, rt)
        while True:
            self.wb.engine._ensure_blocks(s, rt, len(s.tokens))
            end = len(s.tokens)
            pause = self.breakpoint is not None and self.breakpoint[1] == self.step
            if chunk is not None and not pause:
                while end - s.num_cached > chunk:
                    # a leading chunk of the prompt: its K/V; whole, so that without a hook it
                    # replays the plain step's graph (its last row's logits go unused, as there)
                    self._open(chunk, end).finish()
                    s.num_cached += chunk
                    self.computed += chunk
            st = self._open(end - s.num_cached, end)
            if pause:
                layer = self.breakpoint[0]
                st.run(until=layer)
                return self._pause(st, layer)
            if self._end_step(st):
                return self._result()

    def _open(self, n: int, end: int) -> Step:
        s = self.s
        tokens = s.tokens[s.num_cached:s.num_cached + n]
        return open_step(self.wb.engine, self.rt, s.block_table, s.num_cached, tokens,
                         self.plan.hook(s.num_cached, n, end))

    @torch.inference_mode()
    def resume(self, st: Step) -> GenerateResult:
        """Finish the paused step ``st`` (its hidden state possibly replaced), then the rest."""
        self.paused_s += time.perf_counter() - self._paused_at
        self.breakpoint = None   # one breakpoint per generate
        try:
            result = self._result() if self._end_step(st) else self.run()
        except BaseException:
            self.wb.abort_turn(self.turn)
            raise
        return self.wb.finish_turn(self.turn, result)

    def _pause(self, st: Step, layer: int) -> GenerateResult:
        ref = self.wb.pause(self.s, st, layer, self.step, turn=self)
        self._paused_at = time.perf_counter()
        return GenerateResult(token_ids=list(self.out), text=self.rt.tokenizer.decode(self.out, skip_special_tokens=True),
                              finish_reason="breakpoint", prompt_tokens=len(self.turn.new_tokens),
                              cached_tokens=self.turn.cached, computed_tokens=self.computed,
                              session_id=self.s.id, paused=ref)

    def _end_step(self, st: Step) -> bool:
        """The step's remaining layers, head, sampling and stop rules; True when the generation ends."""
        s, rt, params = self.s, self.rt, self.params
        logits = st.finish()
        s.num_cached += st.num_tokens
        self.computed += st.num_tokens
        nxt = int(self.sampler(logits[-1:])[0])
        if self.t_prefill is None:   # the prefill's compute time, without a pause in it
            self.t_prefill = time.perf_counter() - self.turn.started - self.paused_s
        self.out.append(nxt)
        s.tokens.append(nxt)
        self.step += 1
        finish, cut = stop_check(self.out, self.stop_ids, params, rt.tokenizer, len(s.tokens), rt.max_context)
        if finish == "stop":
            self.finish_reason = "stop"
            if cut is not None:
                self.text = cut
        return finish is not None

    def _result(self) -> GenerateResult:
        end = time.perf_counter()
        s = self.s
        s.ended_with_eos = self.finish_reason == "stop" and self.out[-1] in self.stop_ids
        s.tokens_computed += self.computed
        self.wb.engine.counters["tokens_computed"] += self.computed
        text = self.text if self.text is not None else self.rt.tokenizer.decode(self.out, skip_special_tokens=True)
        captured = {layer: self.wb.store.put(s.id, t) for layer, t in self.plan.captured_tensors().items()}
        compute = end - self.turn.started - self.paused_s
        return GenerateResult(
            token_ids=self.out, text=text, finish_reason=self.finish_reason, prompt_tokens=0, cached_tokens=0,
            computed_tokens=self.computed, captured=captured,
            timings={"prefill_ms": self.t_prefill * 1e3, "decode_ms": (compute - self.t_prefill) * 1e3,
                     "compute_ms": compute * 1e3, "paused_ms": self.paused_s * 1e3},
        )
