"""The engine: loaded models, server-resident sessions, and generation.

Public methods are thread-safe: they run their work on the engine loop (one thread owns the
device) and wait for it. Methods whose name starts with ``_`` run on the loop. The exception is
``signal_phase``: it must return at once, so it runs on the caller's thread and goes straight to
``engine.residency`` (which has its own lock) instead of queueing behind a running turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from djinn.config import EngineConfig
from djinn.engine.cache import PagedCache
from djinn.engine.chat import turn_text
from djinn.engine.loop import EngineLoop
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.engine.residency import Residency
from djinn.engine.runtime import ModelRuntime
from djinn.engine.sampling import Sampler
from djinn.engine.session import Phase, Session
from djinn.errors import CapacityError, InvalidRequest, ModelNotFound, SessionClosed, SessionNotFound
from djinn.memory.budget import plan, plan_host


@dataclass
class _Turn:
    """One generate call in progress on the loop."""

    session: Session
    runtime: ModelRuntime
    new_tokens: list[int]


class Engine:
    def __init__(self, models: dict | None = None, config: EngineConfig | None = None):
        """``models``: name -> djinn.models.LoadedModel, already on the engine's device.
        More can be added later with ``add_model``."""
        self.config = config or EngineConfig()
        self.runtimes: dict[str, ModelRuntime] = {}
        self.sessions: dict[str, Session] = {}
        self.counters = {"turns": 0, "tokens_generated": 0, "tokens_computed": 0}
        self.loop = EngineLoop()
        self.residency: Residency | None = None       # where each session's KV lives (first model's device)
        for name, loaded in (models or {}).items():
            self.add_model(name, loaded)

    def add_model(self, name: str, loaded) -> None:
        """Register a loaded model and allocate its KV pool from what the budget has left."""
        self.loop.call(self._add_model, name, loaded)

    def _add_model(self, name: str, loaded) -> None:
        if name in self.runtimes:
            raise InvalidRequest(f"model {name!r} is already loaded")
        mem = self.config.memory
        weights = sum(rt.loaded.weight_bytes() for rt in self.runtimes.values()) + loaded.weight_bytes()
        kv_taken = sum(rt.pool.total_bytes for rt in self.runtimes.values())
        budget = plan(mem, loaded.device, weights + kv_taken)
        block_bytes = ModelRuntime.block_bytes_for(loaded, mem.block_size)
        blocks = mem.kv_blocks if mem.kv_blocks is not None else max(2, budget.kv_bytes // block_bytes)
        rt = ModelRuntime.build(name, loaded, mem.block_size, blocks)
        if self.residency is None:
            self.residency = Residency(mem, loaded.device)
        if mem.host_blocks is not None:
            host_blocks = mem.host_blocks
        else:
            taken = sum(t.arena.target_bytes for t in self.residency.tiers.values())
            host_blocks = plan_host(mem, rt.pool.total_bytes, taken) // rt.kv.block_bytes
        self.residency.add_model(name, rt.pool, host_blocks)
        self.runtimes[name] = rt
        self.budget = budget

    # ---- public, thread-safe ---------------------------------------------------------
    def open_session(self, model: str, owner: str | None = None) -> str:
        return self.loop.call(self._open_session, model, owner)

    def generate(self, session_id: str, request: GenerateRequest, owner: str | None = None) -> GenerateResult:
        submitted = time.perf_counter()
        return self.loop.call(self._generate, session_id, request, owner, submitted)

    def close_session(self, session_id: str, owner: str | None = None) -> None:
        self.loop.call(self._close_session, session_id, owner)

    def signal_phase(self, session_id: str, phase: str, owner: str | None = None) -> None:
        """``IO_WAIT`` / ``ACTIVE``. Returns at once; the copy it starts runs in the background."""
        if phase not in (Phase.IO_WAIT.value, Phase.ACTIVE.value):
            raise InvalidRequest(f"unknown phase {phase!r}; use IO_WAIT or ACTIVE")
        s = self._session(session_id, owner)
        self.residency.signal(s, Phase(phase))

    def session_info(self, session_id: str, owner: str | None = None) -> dict:
        return self.loop.call(lambda: self._describe(self._session(session_id, owner)))

    def stats(self) -> dict:
        return self.loop.call(self._stats)

    def shutdown(self) -> None:
        try:
            self.loop.call(self._close_all)
        finally:
            self.loop.shutdown()
            if self.residency is not None:
                self.residency.close()

    # ---- loop side -------------------------------------------------------------------
    def runtime(self, model: str) -> ModelRuntime:
        rt = self.runtimes.get(model)
        if rt is None:
            raise ModelNotFound(f"model {model!r} is not loaded here; loaded: {', '.join(self.runtimes)}")
        return rt

    def _session(self, session_id: str, owner: str | None) -> Session:
        if not isinstance(session_id, str):
            raise InvalidRequest("session id must be a string")
        s = self.sessions.get(session_id)
        if s is None or (s.owner is not None and s.owner != owner):
            raise SessionNotFound(f"no session {session_id!r}: it never existed, was closed, or is not yours")
        return s

    def _open_session(self, model: str, owner: str | None) -> str:
        self.runtime(model)
        if len(self.sessions) >= self.config.max_sessions:
            raise CapacityError(f"too many sessions ({self.config.max_sessions}); close some first")
        s = Session(model=model, owner=owner)
        self.residency.register(s)
        self.sessions[s.id] = s
        return s.id

    def _close_session(self, session_id: str, owner: str | None) -> None:
        s = self._session(session_id, owner)
        self._free_kv(s)
        s.phase = Phase.CLOSED
        del self.sessions[s.id]

    def _close_all(self) -> None:
        for sid in list(self.sessions):
            self._close_session(sid, self.sessions[sid].owner)

    def _free_kv(self, s: Session) -> None:
        self.residency.release(s)

    def _ensure_blocks(self, s: Session, rt: ModelRuntime, tokens: int) -> None:
        self.residency.grow(s, tokens)    # a no-op after begin_turn reserved the turn's blocks

    def _prompt_tokens(self, s: Session, rt: ModelRuntime, req: GenerateRequest) -> tuple[list[int], list[dict]]:
        """Token ids this turn appends, and the chat messages it adds (if templated)."""
        prompt = req.prompt
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("empty prompt: give some text or token ids")
            chat = rt.loaded.is_chat if req.chat is None else req.chat
            if chat:
                new_msgs = [{"role": "user", "content": prompt}]
                text = turn_text(rt.tokenizer, s.messages, new_msgs, s.ended_with_eos)
                return rt.tokenizer.encode(text, add_special_tokens=False), new_msgs
            return rt.tokenizer.encode(prompt, add_special_tokens=not s.tokens), []
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequest("prompt must be a non-empty string or a non-empty list of token ids")
        vocab = rt.loaded.config.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise InvalidRequest(f"token ids must be integers in [0, {vocab})")
        return list(prompt), []

    def _generate(self, session_id: str, req: GenerateRequest, owner: str | None, submitted: float) -> GenerateResult:
        started = time.perf_counter()
        s = self._session(session_id, owner)
        if s.phase is Phase.PAUSED:
            raise InvalidRequest("the session is paused at a breakpoint: resume it first")
        rt = self.runtime(s.model)
        params = req.params
        params.validate()
        new, new_msgs = self._prompt_tokens(s, rt, req)
        total_prompt = len(s.tokens) + len(new)
        if total_prompt >= rt.max_context:
            raise InvalidRequest(
                f"prompt too long: the session would hold {total_prompt} tokens, the model's context is "
                f"{rt.max_context}; start a new session or shorten the prompt"
            )
        # bring the KV back (restore or recompute) and reserve the whole turn's blocks up front
        memory = self.residency.begin_turn(s, min(total_prompt + params.max_new_tokens, rt.max_context))
        cached = s.num_cached
        history_len = len(s.tokens)
        s.tokens.extend(new)
        try:
            result = self._run_turn(s, rt, params, time.perf_counter())
        except BaseException:
            # leave the session exactly as before the turn (its KV past num_cached is garbage)
            del s.tokens[history_len:]
            s.num_cached = min(s.num_cached, cached)
            raise
        finally:
            self.residency.end_turn(s)
        s.messages.extend(new_msgs)
        if new_msgs:
            s.messages.append({"role": "assistant", "content": result.text})
        s.turns += 1
        s.touch()
        result.prompt_tokens = len(new)
        result.cached_tokens = cached
        result.session_id = s.id
        result.timings["queue_ms"] = (started - submitted) * 1e3
        result.timings["restore_ms"] = memory["restore_ms"]        # waiting for its KV: room + own restore
        result.timings["make_room_ms"] = memory["make_room_ms"]    # of which: waiting for others' parks
        result.timings["total_ms"] = (time.perf_counter() - submitted) * 1e3
        self.counters["turns"] += 1
        self.counters["tokens_generated"] += len(result.token_ids)
        return result

    @torch.inference_mode()
    def _run_turn(self, s: Session, rt: ModelRuntime, params, started: float) -> GenerateResult:
        device = rt.device
        sampler = Sampler(params, device)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(rt.eos_ids()))
        out: list[int] = []
        computed = 0
        finish = "length"
        text = None
        t_prefill = None
        while True:
            pending = s.tokens[s.num_cached:]
            self._ensure_blocks(s, rt, len(s.tokens))
            cache = PagedCache(rt.pool, s.block_table, s.num_cached, len(pending))
            ids = torch.tensor([pending], dtype=torch.long, device=device)
            logits = rt.executor.forward(cache, ids)
            s.num_cached += len(pending)
            computed += len(pending)
            nxt = int(sampler(logits[-1:])[0])
            if t_prefill is None:
                t_prefill = time.perf_counter()
            out.append(nxt)
            s.tokens.append(nxt)
            if nxt in stop_ids:
                finish = "stop"
                break
            if params.stop:
                text = rt.tokenizer.decode(out, skip_special_tokens=True)
                hit = min((text.find(x) for x in params.stop if x in text), default=-1)
                if hit >= 0:
                    text, finish = text[:hit], "stop"
                    break
            if len(out) >= params.max_new_tokens or len(s.tokens) >= rt.max_context:
                break
        end = time.perf_counter()
        s.ended_with_eos = finish == "stop" and out[-1] in stop_ids
        s.tokens_computed += computed
        self.counters["tokens_computed"] += computed
        if text is None:
            text = rt.tokenizer.decode(out, skip_special_tokens=True)
        return GenerateResult(
            token_ids=out, text=text, finish_reason=finish, prompt_tokens=0, cached_tokens=0,
            computed_tokens=computed,
            timings={"prefill_ms": (t_prefill - started) * 1e3, "decode_ms": (end - t_prefill) * 1e3,
                     "compute_ms": (end - started) * 1e3},
        )

    def _describe(self, s: Session) -> dict:
        rt = self.runtime(s.model)
        with self.residency.lock:
            blocks = max(len(s.block_table), len(s.host_table))
            return {"session_id": s.id, "model": s.model, "phase": s.phase.value, "tokens": len(s.tokens),
                    "kv_tokens": s.num_cached, "kv_blocks": blocks, "kv_location": self.residency.location(s),
                    "kv_bytes": blocks * rt.kv.block_bytes, "turns": s.turns}

    def _stats(self) -> dict:
        weights = {n: rt.loaded.weight_bytes() for n, rt in self.runtimes.items()}
        mem = self.residency.stats() if self.residency is not None else {}
        kv_used = sum(rt.pool.used_bytes for rt in self.runtimes.values())
        kv_total = sum(rt.pool.total_bytes for rt in self.runtimes.values())
        phases: dict[str, int] = {}
        for s in self.sessions.values():
            phases[s.phase.value] = phases.get(s.phase.value, 0) + 1
        return {
            "device": str(next(iter(self.runtimes.values())).device),
            "policy": mem.get("policy"),
            "memory": {"weights": sum(weights.values()), "weights_by_model": weights, "kv_device": kv_used,
                       "kv_device_capacity": kv_total, "kv_parked": mem.get("kv_parked", 0),
                       **{k: mem[k] for k in ("kv_moving", "kv_device_high_water", "kv_host_capacity",
                                              "kv_host_target", "host_arena_ready") if k in mem}},
            "sessions": len(self.sessions), "sessions_by_phase": phases,
            "sessions_by_kv_location": mem.get("sessions_by_kv_location", {}),
            "swaps": mem.get("swaps", {}), "bytes_moved": mem.get("bytes_moved", {}),
            "bandwidth_gbps": mem.get("bandwidth_gbps", {}),
            "kv_blocks": {n: {"used": rt.pool.used_count, "free": rt.pool.free_count, "block_bytes": rt.kv.block_bytes}
                          for n, rt in self.runtimes.items()},
            **self.counters,
        }
