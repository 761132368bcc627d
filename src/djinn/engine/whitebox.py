"""White-box execution: forwards that pause after any decoder layer, resume with the
activation unchanged or replaced, and the server-side tensors clients hold by handle.

The engine owns one :class:`WhiteBox`; its methods run on the engine loop. Every forward
here is a :class:`~djinn.engine.whitebox_step.Step` on the plain path's numerics (a one-item
batch where plain turns are batched), so a pause, an intervention or a capture changes
nothing but what it asks for. A paused forward is a :class:`PausedForward`: the step (hidden
state, next layer, the layer arguments the model's own code built, its block table and hook)
plus what finishing it needs. Pausing returns from the loop, so a paused session holds no
compute; its KV blocks (which already hold layers 0..N of the in-flight tokens) and its
activation are ordinary session memory. Semantics are in docs/whitebox.md.

Invariants:
- a session is PAUSED exactly while one PausedForward of it exists, and then runs nothing
  else (generate, forward and signal_phase refuse);
- the session's ``tokens``/``num_cached`` advance only when a forward completes (a paused
  generation has appended the tokens of the steps it finished, as any generation does);
- a bad replacement activation changes nothing: the session stays paused, resumable;
- a paused id resumes at most once; afterwards (or after close) it gives a clear error.
"""

from __future__ import annotations

import itertools
import numbers
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from djinn.engine.interventions import LayerPlan
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.engine.session import Phase, Session
from djinn.engine.sharing import changes_kv
from djinn.engine.tensors import TensorStore
from djinn.engine.whitebox_step import Step, open_step
from djinn.errors import InvalidRequest, SessionClosed
from djinn.protocol.expr import evaluate_expr

if TYPE_CHECKING:  # pragma: no cover
    from djinn.engine.engine import Engine, _Turn
    from djinn.engine.runtime import ModelRuntime
    from djinn.engine.sampling import SamplingParams

_REMEMBER = 4096   # finished paused ids kept, to say "already resumed" / "closed" instead of "unknown"


@dataclass
class PausedForward:
    id: str
    session_id: str
    layer: int
    step: int
    state: Step
    activation_id: str
    prev_phase: Phase
    # a paused forward(): the tokens it appends on completion, and the blocks to give back if it fails
    new_tokens: list[int] = field(default_factory=list)
    blocks_before: int = 0
    # a paused generate(): the turn it continues (djinn.engine.whitebox_turn.WhiteboxTurn)
    turn: Any = None


def _check_layer(value: Any, num_layers: int, what: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value < num_layers:
        raise InvalidRequest(f"{what} must be a decoder layer index in [0, {num_layers - 1}] "
                             f"(the model has {num_layers} layers), got {value!r}")
    return int(value)


class WhiteBox:
    def __init__(self, engine: "Engine", max_tensors: int, max_tensor_bytes: int):
        self.engine = engine
        self.store = TensorStore(max_tensors, max_tensor_bytes)
        self.paused: dict[str, PausedForward] = {}
        self._by_session: dict[str, str] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()   # paused id -> "resumed" | "closed" | "aborted"
        self._ids = itertools.count(1)

    # ---- forward ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, session_id: str, input_ids, breakpoint: int | None, interventions: Sequence[dict],
                owner: str | None) -> dict:
        eng = self.engine
        s = self._runnable(session_id, owner)
        rt = eng.runtime(s.model)
        L = rt.arch.num_layers
        if breakpoint is not None:
            breakpoint = _check_layer(breakpoint, L, "breakpoint")
        ids = self._input_ids(s, rt, input_ids)
        plan = self._plan(rt, interventions, [])
        total = len(s.tokens) + len(ids)
        if total >= rt.max_context:
            raise InvalidRequest(f"input too long: the session would hold {total} tokens, the model's context is "
                                 f"{rt.max_context}")
        eng.residency.begin_turn(s, total, activate=False)   # its KV back on the device ...
        eng._rebuild(s, rt)                  # ... or, if it was dropped, recomputed without hooks
        # what it computes is never shared (engine/sharing.py); edited K/V never with plain sessions
        eng.residency.share_prefix(s, total, lookup=False, taint=changes_kv((plan, breakpoint), L))
        start = s.num_cached
        pending = s.tokens[start:] + ids   # a previous generate's last sampled token is computed first
        blocks_before = len(s.block_table)
        try:
            act_bytes = len(pending) * rt.loaded.config.hidden_size * rt.kv.dtype.itemsize
            self.store.check_room(s.id, len(pending) * rt.loaded.config.vocab_size * 4 + act_bytes)
            # one step over every token, paused or not, so forward(bp) + resume() == forward()
            st = open_step(eng, rt, s.block_table, start, pending, plan.hook(start, len(pending)), all_logits=True)
            if breakpoint is None:
                return {"logits": self._complete_forward(s, st, ids)}
            st.run(until=breakpoint)
            ref = self.pause(s, st, breakpoint, 0, new_tokens=ids, blocks_before=blocks_before)
            eng.residency.pause_turn(s)   # idle while paused: its KV may be parked
            return {"paused": ref}
        except BaseException:
            self._trim_blocks(s, rt, blocks_before)
            raise

    def _complete_forward(self, s: Session, st: Step, ids: list[int]) -> dict:
        logits = st.finish()
        ref = self.store.put(s.id, logits)
        s.tokens.extend(ids)
        s.num_cached += st.num_tokens
        s.tokens_computed += st.num_tokens
        self.engine.counters["tokens_computed"] += st.num_tokens
        self.engine.residency.end_turn(s)
        s.touch()
        return ref

    def pause(self, s: Session, st: Step, layer: int, step: int, *, new_tokens=(), blocks_before: int = 0,
              turn=None) -> dict:
        """Park ``st`` after ``layer``: the session becomes PAUSED; returns the paused_ref."""
        act = self.store.put(s.id, st.hidden[0], pinned=True)
        p = PausedForward(id=f"p{next(self._ids)}", session_id=s.id, layer=layer, step=step, state=st,
                          activation_id=act["id"], prev_phase=s.phase, new_tokens=list(new_tokens),
                          blocks_before=blocks_before, turn=turn)
        self.paused[p.id] = p
        self._by_session[s.id] = p.id
        s.phase = Phase.PAUSED
        s.touch()
        return {"paused_id": p.id, "layer": layer, "step": step, "activation": act}

    # ---- resume -----------------------------------------------------------------------
    @torch.inference_mode()
    def resume(self, paused_id: str, activation, tensors: Sequence[torch.Tensor], owner: str | None) -> dict:
        p = self._paused(paused_id)
        eng = self.engine
        s = eng._session(p.session_id, owner)
        rt = eng.runtime(s.model)
        act = self.store.get(p.activation_id, s.id)
        replaced = activation is not None
        h = self._replacement(activation, tensors, act, s) if replaced else act
        eng.residency.resume_turn(s)     # its KV back on the device if it was parked while paused
        # from here the paused forward is consumed, whatever happens
        self._finish(p, "resumed")
        s.phase = p.prev_phase
        st = p.state
        try:
            st.rebind(s.block_table)   # the memory manager may have moved the blocks while paused
        except BaseException:
            if p.turn is not None:
                self.abort_turn(p.turn.turn)
            else:
                self._trim_blocks(s, rt, p.blocks_before)
            raise
        st.hidden = h.unsqueeze(0)
        if p.turn is not None:
            if replaced:
                p.turn.plan.replace_last_capture(p.layer, h)
            return {"generation": p.turn.resume(st)}   # (it undoes its turn on failure)
        try:
            return {"logits": self._complete_forward(s, st, p.new_tokens)}
        except BaseException:
            self._trim_blocks(s, rt, p.blocks_before)
            raise

    def _replacement(self, activation, tensors: Sequence[torch.Tensor], act: torch.Tensor, s: Session) -> torch.Tensor:
        """The validated replacement for ``act``, on its device and in its dtype."""
        if isinstance(activation, dict):
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                raise InvalidRequest("an expression's client tensors must be torch.Tensors")
            value = evaluate_expr(activation, lambda rid: self.store.get(rid, s.id), list(tensors))
        elif isinstance(activation, torch.Tensor):
            value = activation
        else:
            raise InvalidRequest("resume() takes nothing (unchanged), a torch.Tensor, or an expression over remote "
                                 f"tensors such as p.activation * 0.9; got {type(activation).__name__}")
        if tuple(value.shape) != tuple(act.shape):
            raise InvalidRequest(f"the replacement activation has shape {list(value.shape)}; it must have the "
                                 f"activation's shape {list(act.shape)} ([tokens, hidden])")
        if not value.dtype.is_floating_point:
            raise InvalidRequest(f"the replacement activation has dtype {value.dtype}; give a floating-point tensor "
                                 f"(it is cast to the model's {act.dtype})")
        if value.device != act.device and value.device.type != "cpu":
            raise InvalidRequest(f"the replacement activation is on {value.device}; give a CPU tensor or one on "
                                 f"{act.device}")
        value = value.to(device=act.device, dtype=act.dtype)
        if not bool(torch.isfinite(value).all()):
            raise InvalidRequest("the replacement activation contains NaN or infinity (after casting to "
                                 f"{act.dtype}); the session is still paused, resume with a finite tensor")
        return value

    # ---- tensors --------------------------------------------------------------------
    def fetch(self, tensor_id: str, expr: dict | None, tensors: Sequence[torch.Tensor], owner: str | None) -> torch.Tensor:
        e = self.store.entry(tensor_id)
        s = self.engine._session(e.session_id, owner)
        value = e.tensor
        if expr is not None:
            if not isinstance(expr, dict) or not all(isinstance(t, torch.Tensor) for t in tensors):
                raise InvalidRequest("fetch(expr=...) takes an expression tree and a list of torch.Tensors")
            with torch.inference_mode():
                value = evaluate_expr(expr, lambda rid: self.store.get(rid, s.id), list(tensors))
        # a fresh CPU copy made outside inference mode: an ordinary tensor the client may change
        return value.detach().to("cpu", copy=True)

    def release(self, tensor_id: str, owner: str | None) -> None:
        e = self.store.entry(tensor_id)
        self.engine._session(e.session_id, owner)
        self.store.release(tensor_id)

    # ---- generation with interventions / captures / a breakpoint ------------------------
    def plan(self, rt: "ModelRuntime", req: GenerateRequest) -> tuple[LayerPlan, tuple[int, int] | None]:
        """Validate a generate request's white-box parts before anything changes."""
        bp = req.breakpoint
        if bp is not None:
            if isinstance(bp, dict) and set(bp) == {"layer", "step"}:
                bp = (bp["layer"], bp["step"])
            elif isinstance(bp, numbers.Integral) and not isinstance(bp, bool):
                bp = (bp, 0)
            if not isinstance(bp, (tuple, list)) or len(bp) != 2:
                raise InvalidRequest(f"breakpoint must be (layer, step), got {req.breakpoint!r}")
            layer = _check_layer(bp[0], rt.arch.num_layers, "breakpoint layer")
            step = bp[1]
            if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
                raise InvalidRequest(f"breakpoint step must be an integer >= 0 (0 = the prefill), got {step!r}")
            if step >= req.params.max_new_tokens:
                raise InvalidRequest(f"breakpoint step {step} never runs: a generation of max_new_tokens="
                                     f"{req.params.max_new_tokens} runs steps 0..{req.params.max_new_tokens - 1}")
            bp = (layer, int(step))
        return self._plan(rt, req.interventions, req.capture), bp

    def run_turn(self, turn: "_Turn", params: "SamplingParams", plan) -> GenerateResult:
        from djinn.engine.whitebox_turn import WhiteboxTurn

        layer_plan, bp = plan
        s, rt = turn.session, turn.runtime
        # captures are stored at the end: refuse now what could not be stored then
        tokens = len(s.tokens) - s.num_cached + params.max_new_tokens
        self.store.check_room(s.id, len(layer_plan.capture) * tokens * rt.loaded.config.hidden_size
                              * rt.kv.dtype.itemsize)
        return WhiteboxTurn(self, turn, params, layer_plan, bp).run()

    def finish_turn(self, turn: "_Turn", result: GenerateResult) -> GenerateResult:
        return self.engine._complete_turn(turn, result)

    def abort_turn(self, turn: "_Turn") -> None:
        self.engine._rollback_turn(turn)

    # ---- lifecycle ----------------------------------------------------------------------
    def on_close(self, s: Session) -> None:
        pid = self._by_session.get(s.id)
        if pid is not None:
            self._finish(self.paused[pid], "closed")
        self.store.drop_session(s.id)

    def paused_of(self, session_id: str) -> str | None:
        return self._by_session.get(session_id)

    # ---- helpers ----------------------------------------------------------------------
    def _runnable(self, session_id: str, owner: str | None) -> Session:
        s = self.engine._session(session_id, owner)
        if s.phase is Phase.PAUSED:
            raise InvalidRequest(f"the session is paused at a breakpoint ({self._by_session.get(s.id)}): "
                                 "resume it (or close the session) first")
        return s

    def _input_ids(self, s: Session, rt: "ModelRuntime", input_ids) -> list[int]:
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dtype.is_floating_point or input_ids.dim() > 2 or (input_ids.dim() == 2 and
                                                                             input_ids.shape[0] != 1):
                raise InvalidRequest("input_ids must be integer token ids shaped [tokens] or [1, tokens]")
            input_ids = input_ids.reshape(-1).tolist()
        ids, _ = self.engine._prompt_tokens(s, rt, GenerateRequest(prompt=input_ids, chat=False))
        return ids

    def _plan(self, rt: "ModelRuntime", interventions, capture) -> LayerPlan:
        return LayerPlan(interventions, capture, rt.arch.num_layers, rt.loaded.config.hidden_size, rt.device,
                         rt.kv.dtype)

    def _paused(self, paused_id: str) -> PausedForward:
        if not isinstance(paused_id, str):
            raise InvalidRequest(f"a paused id is a string, got {type(paused_id).__name__}")
        p = self.paused.get(paused_id)
        if p is not None:
            return p
        why = self._finished.get(paused_id)
        if why == "resumed":
            raise InvalidRequest(f"paused forward {paused_id} was already resumed; a breakpoint resumes once")
        if why == "closed":
            raise SessionClosed(f"the session of paused forward {paused_id} was closed; open a new session")
        raise InvalidRequest(f"unknown paused id {paused_id!r}")

    def _finish(self, p: PausedForward, why: str) -> None:
        del self.paused[p.id]
        self._by_session.pop(p.session_id, None)
        self.store.unpin(p.activation_id)
        self._finished[p.id] = why
        while len(self._finished) > _REMEMBER:
            self._finished.popitem(last=False)

    def _trim_blocks(self, s: Session, rt: "ModelRuntime", keep: int) -> None:
        """Give back blocks a failed forward allocated (memory returns to where it was): the
        residency keeps the blocks of the cached tokens and ends the session's turn."""
        self.engine.residency.end_turn(s)
