"""The engine: loaded models, server-resident sessions, and generation.

Public methods are thread-safe: they run their work on the engine loop (one thread owns the
device) and wait for it. Methods whose name starts with ``_`` run on the loop. ``signal_phase``
goes through the loop's signal channel (engine/loop.py), ahead of queued calls: it waits at most
for the step or call in progress, and the copy it starts then runs in the background.
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from djinn.config import EngineConfig
from djinn.engine.admission import Admission
from djinn.engine.batcher import Batcher
from djinn.engine.cache import PagedCache
from djinn.engine.chat import turn_text
from djinn.engine.fork import fork_session
from djinn.engine.loop import EngineLoop
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.engine.residency import Residency
from djinn.engine.room import CopyPending, RoomHeld
from djinn.engine.runtime import ModelRuntime
from djinn.engine.sampling import Sampler, stop_check
from djinn.engine.session import Phase, Session
from djinn.engine.sharing import changes_kv
from djinn.engine.whitebox import WhiteBox
from djinn.errors import CapacityError, Cancelled, InvalidRequest, ModelNotFound, SessionClosed, SessionNotFound
from djinn.memory.budget import plan, plan_host
from djinn.memory.policy import KVState


# Engines not shut down yet. A daemon thread still inside a torch call when the interpreter
# exits aborts the process; ``shutdown_all`` (tests, CLI exit) stops every engine first.
_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def shutdown_all() -> None:
    """Shut down every engine of this process that is still running."""
    for engine in list(_LIVE):
        engine.shutdown()


@dataclass
class _Turn:
    """One generate call in progress on the loop: what finishing or undoing it needs."""

    session: Session
    runtime: ModelRuntime
    new_tokens: list[int]
    new_msgs: list[dict]
    cached: int               # the session's num_cached before the turn
    history_len: int          # len(session.tokens) before the turn
    started: float            # when its compute started (after the memory it needed was ready)
    submitted: float
    memory: dict = field(default_factory=dict)   # queue_ms, restore_ms, make_room_ms (engine.residency)


class Engine(Admission):
    def __init__(self, models: dict | None = None, config: EngineConfig | None = None):
        """``models``: name -> djinn.models.LoadedModel, already on the engine's device.
        More can be added later with ``add_model``."""
        self.config = config or EngineConfig()
        self.runtimes: dict[str, ModelRuntime] = {}
        self.sessions: dict[str, Session] = {}
        self.counters = {"turns": 0, "tokens_generated": 0, "tokens_computed": 0}
        self.loop = EngineLoop()
        _LIVE.add(self)
        self.residency: Residency | None = None       # where each session's KV lives (first model's device)
        self.whitebox = WhiteBox(self, self.config.max_tensors_per_session, self.config.max_tensor_bytes_per_session)
        c = self.config
        self.batcher = Batcher(self, c.prefill_chunk_tokens, c.max_batch, c.cuda_graphs)
        self.load_times: dict[str, dict] = {}     # model -> seconds its start took, by part
        self._init_admission()
        self.loop.set_stepper(self._has_work, self._step)
        # persistence hooks (server/journal.py), called on the loop: after a turn commits or a
        # truncation, ``on_commit(session)``; after a close, ``on_close(session_id)``
        self.on_commit = None
        self.on_close = None
        for name, loaded in (models or {}).items():
            self.add_model(name, loaded)

    def add_model(self, name: str, loaded, weights_s: float | None = None) -> None:
        """Register a loaded model and allocate its KV pool from what the budget has left.
        ``weights_s``: how long loading its weights took (reported with the rest of its start)."""
        self.loop.call(self._add_model, name, loaded, weights_s)

    def _add_model(self, name: str, loaded, weights_s: float | None = None) -> None:
        t = time.perf_counter()
        if name in self.runtimes:
            raise InvalidRequest(f"model {name!r} is already loaded")
        mem = self.config.memory
        weights = (sum(rt.device_weight_bytes for rt in self.runtimes.values())
                   + ModelRuntime.device_weight_bytes_for(loaded, mem))
        kv_taken = sum(rt.pool.total_bytes for rt in self.runtimes.values())
        budget = plan(mem, loaded.device, weights + kv_taken)
        block_bytes = ModelRuntime.block_bytes_for(loaded, mem.block_size)
        blocks = mem.kv_blocks if mem.kv_blocks is not None else max(2, budget.kv_bytes // block_bytes)
        rt = ModelRuntime.build(name, loaded, mem.block_size, blocks, memory=mem)
        if self.residency is None:
            self.residency = Residency(mem, loaded.device, prefix_sharing=self.config.prefix_sharing)
        if mem.host_blocks is not None:
            host_blocks = mem.host_blocks
        else:
            taken = sum(t.arena.target_bytes for t in self.residency.tiers.values())
            host_blocks = plan_host(mem, rt.pool.total_bytes, taken) // rt.kv.block_bytes
        self.residency.add_model(name, rt.pool, host_blocks)
        self.runtimes[name] = rt
        self.budget = budget
        took = {"weights_s": round(weights_s, 2)} if weights_s is not None else {}
        took["kv_pools_s"] = round(time.perf_counter() - t, 2)
        if self.config.warmup and self.config.batching:
            took.update(self.batcher.runner.warmup(rt))
        took["total_s"] = round(sum(took.values()), 2)
        self.load_times[name] = took

    # ---- public, thread-safe ---------------------------------------------------------
    def open_session(self, model: str, owner: str | None = None) -> str:
        return self.loop.call(self._open_session, model, owner)

    def generate(self, session_id: str, request: GenerateRequest, owner: str | None = None) -> GenerateResult:
        if self.loop.in_loop():   # cannot wait for a step on the loop itself: run this turn alone
            return self._generate(session_id, request, owner, time.perf_counter(), batch=False)
        return self.submit_generate(session_id, request, owner).result()

    def submit_generate(self, session_id: str, request: GenerateRequest, owner: str | None = None) -> Future:
        """Start a turn; the future resolves with its GenerateResult (or error). Never blocks,
        also when called on the loop thread (the servers' gateways do that)."""
        submitted = time.perf_counter()
        out: Future = Future()
        copy = {"since": None, "waited_s": 0.0}   # time spent aside while its KV was copied

        def start(retry: bool = False) -> None:
            if not retry and self._deferred:      # others wait for room: behind them
                self._wait_for_room(start, out, submitted, head=False)
                return
            if copy["since"] is not None:
                copy["waited_s"] += time.perf_counter() - copy["since"]
                copy["since"] = None
            try:
                r = self._generate(session_id, request, owner, submitted, copy_wait_s=copy["waited_s"])
            except CopyPending as exc:            # its restore runs; begin_turn left the session
                copy["since"] = time.perf_counter()     # admitting: start again when the copy is done
                self._copying.append((exc.transfer, start, out, submitted))
                return
            except RoomHeld as exc:
                if not self._defer(start, out, submitted, head=retry):
                    out.set_exception(exc)
                return
            except BaseException as exc:
                out.set_exception(exc)
                return
            if isinstance(r, Future):
                r.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception() is not None
                                    else out.set_result(f.result()))
            else:
                out.set_result(r)

        if self.loop.in_loop():
            start()
        else:
            self.loop.submit(start)
        return out

    def close_session(self, session_id: str, owner: str | None = None) -> None:
        self.loop.call(self._close_session, session_id, owner)

    def signal_phase(self, session_id: str, phase: str, owner: str | None = None) -> None:
        """``IO_WAIT`` / ``ACTIVE``. Returns once the loop applied it (at most a step later, never
        behind queued calls); the copy it starts runs in the background."""
        if phase not in (Phase.IO_WAIT.value, Phase.ACTIVE.value):
            raise InvalidRequest(f"unknown phase {phase!r}; use IO_WAIT or ACTIVE")
        if self.loop.in_loop():
            self._signal_phase(session_id, Phase(phase), owner)
            return
        self.loop.signal(self._signal_phase, session_id, Phase(phase), owner).result()

    def _signal_phase(self, session_id: str, phase: Phase, owner: str | None) -> None:
        self.residency.signal(self._session(session_id, owner), phase)

    def truncate(self, session_id: str, length: int, owner: str | None = None) -> None:
        """Cut a session's history to its first ``length`` tokens, dropping their KV past that.

        For front ends that find a client's conversation diverging from the session (an edited
        message, a re-tokenized reply): KV of tokens that no longer match is never reused."""
        self.loop.call(self._truncate, session_id, length, owner)

    def fork(self, session_id: str, owner: str | None = None) -> dict:
        """A new session with the same history and KV, its blocks shared copy-on-write
        (engine/fork.py): ``{"session_id", "paused"}``; ``paused`` is the child's paused_ref
        when the session was paused at a breakpoint (the child is paused at the same point)."""
        return self.loop.call(fork_session, self, session_id, owner)
    def restore_session(self, session_id: str, model: str, owner: str | None, tokens: list[int],
                        messages: list[dict], ended_with_eos: bool = False, turns: int = 0, cached: int = 0) -> None:
        """Re-create a journaled session (server/journal.py) with its KV dropped: its next turn
        recomputes ``tokens[:cached]`` first, as after a drop."""
        self.loop.call(self._restore_session, session_id, model, owner, list(tokens), list(messages),
                       ended_with_eos, turns, cached)

    def session_info(self, session_id: str, owner: str | None = None) -> dict:
        return self.loop.call(lambda: self._describe(self._session(session_id, owner)))

    def stats(self) -> dict:
        return self.loop.call(self._stats)

    # ---- white-box: breakpoints, server-side tensors (engine/whitebox.py) -------------
    def forward(self, session_id: str, input_ids, breakpoint: int | None = None, interventions=(),
                owner: str | None = None) -> dict:
        """Run a forward over ``input_ids``: ``{"logits": tensor_ref}``, or with a breakpoint
        ``{"paused": paused_ref}`` after that decoder layer."""
        return self.loop.call(self.whitebox.forward, session_id, input_ids, breakpoint, interventions, owner)

    def resume(self, paused_id: str, activation=None, tensors=(), owner: str | None = None) -> dict:
        """Continue a paused forward (``{"logits": ...}``) or generation (``{"generation": ...}``),
        optionally with a replacement activation (a tensor or an expression tree over ``tensors``)."""
        return self.loop.call(self.whitebox.resume, paused_id, activation, tensors, owner)

    def fetch(self, tensor_id: str, expr: dict | None = None, tensors=(), owner: str | None = None) -> torch.Tensor:
        """A server-side tensor (or an expression over that session's tensors) as a CPU tensor."""
        return self.loop.call(self.whitebox.fetch, tensor_id, expr, tensors, owner)

    def release(self, tensor_id: str, owner: str | None = None) -> None:
        self.loop.call(self.whitebox.release, tensor_id, owner)

    def shutdown(self) -> None:
        try:
            self.loop.call(self._close_all)
        finally:
            self.loop.shutdown()
            if self.residency is not None:
                self.residency.close()
            for rt in self.runtimes.values():   # copy threads must not outlive the engine
                if rt.streamer is not None:
                    rt.streamer.close()
            _LIVE.discard(self)

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
        self.batcher.cancel_session(s, SessionClosed(f"session {s.id} was closed during its turn"))
        self.whitebox.on_close(s)
        self._free_kv(s)
        s.phase = Phase.CLOSED
        del self.sessions[s.id]
        if self.on_close is not None:
            self.on_close(s.id)

    def _restore_session(self, sid: str, model: str, owner: str | None, tokens: list[int], messages: list[dict],
                         ended_with_eos: bool, turns: int, cached: int) -> None:
        self.runtime(model)
        if sid in self.sessions:
            raise InvalidRequest(f"session {sid!r} exists already")
        if len(self.sessions) >= self.config.max_sessions:
            raise CapacityError(f"too many sessions ({self.config.max_sessions}); close some first")
        s = Session(model=model, owner=owner, id=sid, tokens=tokens, messages=messages,
                    ended_with_eos=ended_with_eos, turns=turns)
        self.residency.register(s)
        s.kv_state, s.rebuild_to = KVState.DROPPED, max(0, min(cached, len(tokens)))
        self.sessions[sid] = s

    def _truncate(self, session_id: str, length: int, owner: str | None) -> None:
        s = self._session(session_id, owner)
        if s.phase is Phase.PAUSED:
            raise InvalidRequest("the session is paused at a breakpoint: resume it before truncating")
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= len(s.tokens):
            raise InvalidRequest(f"truncate length must be an integer in [0, {len(s.tokens)}], got {length!r}")
        if length == len(s.tokens):
            return
        del s.tokens[length:]
        self.residency.truncate(s, length)      # KV past ``length``, wherever it is, is given back
        # the templated chat history no longer describes the tokens: later text turns start afresh
        s.messages = []
        s.ended_with_eos = False
        s.touch()
        if self.on_commit is not None:
            self.on_commit(s)

    def _close_all(self) -> None:
        self._cancel_waiting(Cancelled("the engine is shutting down"))
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

    def _generate(self, session_id: str, req: GenerateRequest, owner: str | None, submitted: float,
                  batch: bool = True, copy_wait_s: float = 0.0) -> GenerateResult | Future:
        """Run a turn (``batch``: hand it to the batcher). A batched turn whose KV is being
        restored raises ``CopyPending`` (``submit_generate`` starts it again when the copy is
        done, ``copy_wait_s`` later in all) instead of holding the loop meanwhile."""
        started = time.perf_counter()
        s = self._session(session_id, owner)
        if s.phase is Phase.PAUSED:
            raise InvalidRequest("the session is paused at a breakpoint: resume it first")
        rt = self.runtime(s.model)
        params = req.params
        params.validate()
        wb_plan = self.whitebox.plan(rt, req) if req.whitebox else None
        new, new_msgs = self._prompt_tokens(s, rt, req)
        total_prompt = len(s.tokens) + len(new)
        if total_prompt >= rt.max_context:
            raise InvalidRequest(
                f"prompt too long: the session would hold {total_prompt} tokens, the model's context is "
                f"{rt.max_context}; start a new session or shorten the prompt"
            )
        # bring the KV back (restore or recompute) ...
        memory = self.residency.begin_turn(s, len(s.tokens), wait=not batch)
        memory["queue_ms"] = (started - submitted - copy_wait_s) * 1e3
        memory["restore_ms"] += copy_wait_s * 1e3
        batched = wb_plan is None and batch and self.config.batching and rt.streamer is None
        if not batched:
            self._rebuild(s, rt, memory)      # a plain forward, before any hook sees the prompt
        elif s.rebuild_to > s.num_cached:
            memory["rebuild_to"] = s.rebuild_to
        # a batched turn recomputes a dropped prefix in its own prefill chunks, between the other
        # turns' steps, instead of in one forward that holds the loop (0.8-1.1 s on the H200 the
        # first time); ``rebuild_to`` stays set until it completes, so a failed turn leaves the
        # prefix to be rebuilt again
        turn = _Turn(s, rt, new, new_msgs, s.num_cached, len(s.tokens), time.perf_counter(), submitted, memory)
        s.tokens.extend(new)
        try:
            # ... take the full blocks of the prompt that another session holds (prefix sharing,
            # engine/sharing.py) and reserve the rest of the whole turn's blocks up front
            memory["shared_tokens"] = self.residency.share_prefix(
                s, len(s.tokens) - 1, lookup=wb_plan is None, taint=changes_kv(wb_plan, rt.arch.num_layers))
            room_ms = self.residency.grow(s, min(total_prompt + params.max_new_tokens, rt.max_context)) * 1e3
        except BaseException:
            self._rollback_turn(turn)
            raise
        memory["make_room_ms"] += room_ms
        memory["restore_ms"] += room_ms
        turn.started = time.perf_counter()
        if batched:
            return self.batcher.add(turn, params, req)   # resolved by a later step
        try:
            if wb_plan is None:
                result = self._run_turn(s, rt, params, turn.started, req)
            else:
                result = self.whitebox.run_turn(turn, params, wb_plan)
                if result.paused is not None:  # stopped at a breakpoint: resume() finishes the turn
                    self.residency.pause_turn(s)   # idle while paused: its KV may be parked
                    return result
        except BaseException:
            self._rollback_turn(turn)
            raise
        return self._complete_turn(turn, result)

    def _rollback_turn(self, turn: _Turn) -> None:
        """Leave the session exactly as before the turn (its KV past num_cached is garbage)."""
        s = turn.session
        del s.tokens[turn.history_len:]
        s.num_cached = min(s.num_cached, turn.cached)
        self.residency.end_turn(s)

    def _complete_turn(self, turn: _Turn, result: GenerateResult) -> GenerateResult:
        s = turn.session
        self.residency.end_turn(s)
        if s.num_cached >= s.rebuild_to:         # a batched turn recomputed the dropped prefix
            s.rebuild_to = 0
        s.messages.extend(turn.new_msgs)
        if turn.new_msgs:
            s.messages.append({"role": "assistant", "content": result.text})
        s.turns += 1
        s.touch()
        result.prompt_tokens = len(turn.new_tokens)
        rebuilt = int(turn.memory.get("recomputed_tokens", 0))
        # a rebuilt prefix was computed, not reused; a shared one was reused
        result.cached_tokens = turn.cached - rebuilt + int(turn.memory.get("shared_tokens", 0))
        result.computed_tokens += rebuilt
        if "recompute_ms" in turn.memory:      # (rebuilt alone, or in the turn's own prefill chunks)
            result.timings["recompute_ms"] = turn.memory["recompute_ms"]
        result.session_id = s.id
        result.timings["queue_ms"] = turn.memory.get("queue_ms", 0.0)
        result.timings["restore_ms"] = turn.memory.get("restore_ms", 0.0)      # waiting for its KV: room + restore
        result.timings["make_room_ms"] = turn.memory.get("make_room_ms", 0.0)  # of which: waiting for others' parks
        result.timings["total_ms"] = (time.perf_counter() - turn.submitted) * 1e3
        self.counters["turns"] += 1
        self.counters["tokens_generated"] += len(result.token_ids)
        if self.on_commit is not None:
            self.on_commit(s)
        return result

    @torch.inference_mode()
    def _rebuild(self, s: Session, rt: ModelRuntime, memory: dict | None = None) -> None:
        """Recompute the KV of a dropped session's prefix (``tokens[:rebuild_to]``) with a plain
        forward (no hooks), so the turn that follows sees exactly the state it had before the
        drop. Called after ``begin_turn`` reserved the blocks; on failure the session stays
        dropped and its turn is ended."""
        n = s.rebuild_to
        if n == 0:
            return
        t0 = time.perf_counter()
        self.residency.share_prefix(s, n)      # blocks of the prefix other sessions hold are not recomputed
        start = min(s.num_cached, n)
        try:
            if start < n:
                cache = PagedCache(rt.pool, s.block_table, start, n - start)
                rt.executor.forward(cache, torch.tensor([s.tokens[start:n]], dtype=torch.long, device=rt.device))
        except BaseException:
            self.residency.end_turn(s)
            raise
        s.num_cached, s.rebuild_to = max(s.num_cached, n), 0
        s.tokens_computed += n - start
        self.counters["tokens_computed"] += n - start
        if memory is not None:
            memory["recomputed_tokens"] = n - start
            memory["recompute_ms"] = (time.perf_counter() - t0) * 1e3

    @torch.inference_mode()
    def _run_turn(self, s: Session, rt: ModelRuntime, params, started: float,
                  req: GenerateRequest | None = None) -> GenerateResult:
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
            last = logits[-1:]
            if req is not None and req.logits_processor is not None:
                last = req.logits_processor(out, last)
            nxt = int(sampler(last)[0])
            if t_prefill is None:
                t_prefill = time.perf_counter()
            out.append(nxt)
            s.tokens.append(nxt)
            if req is not None and req.on_token is not None:
                req.on_token(nxt)
            done, cut = stop_check(out, stop_ids, params, rt.tokenizer, len(s.tokens), rt.max_context)
            if done is not None:
                finish, text = done, cut
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
                                              "kv_host_target", "host_arena_ready") if k in mem},
                       "tensors": self.whitebox.store.total_bytes},
            "sessions": len(self.sessions), "sessions_by_phase": phases,
            "sessions_by_kv_location": mem.get("sessions_by_kv_location", {}),
            "sharing": mem.get("sharing", {}),   # KV blocks shared by forks, counted once in kv_device
            "swaps": mem.get("swaps", {}), "bytes_moved": mem.get("bytes_moved", {}),
            "bandwidth_gbps": mem.get("bandwidth_gbps", {}), "copy_calls": mem.get("copy_calls", {}),
            "decisions": mem.get("decisions", {}), "wait_estimate_s": mem.get("wait_estimate_s"),  # policy.plan_wait
            "kv_blocks": {n: {"used": rt.pool.used_count, "free": rt.pool.free_count, "block_bytes": rt.kv.block_bytes}
                          for n, rt in self.runtimes.items()},
            "batching": self.batcher.stats(),
            "load_s": dict(self.load_times),   # per model: weights, pools, graph capture, eager warm-up
            "loop_slow": {"count": self.loop.slow_total, "last": list(self.loop.slow)},
            "loop": {**self.loop.stats(), **{f"blocked_{k}_s": v for k, v in mem.get("blocked_s", {}).items()}},
            "streaming": {n: rt.streamer.stats() for n, rt in self.runtimes.items() if rt.streamer is not None},
            **self.counters,
        }
