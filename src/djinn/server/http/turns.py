"""One chat turn over a server-resident session: match, append only what is new, generate,
leave the session exactly as the client's next request will render it, set its phase.

Owns the front end's shared state (``Frontend``: the engine, renderers, grammars, the session
index) and the life of one turn (``Turn``). Engine calls block on the engine loop, so they run
in worker threads; everything else runs on the event loop, which is why the session index
needs no lock. A turn holds its session's lock from matching until the session is consistent
again, even when the client that asked for it is gone.

After generating, the session's history is made equal to the tokens the next request will
render for this reply (``Renderer.with_reply``): a reply the model tokenized differently from
the tokenizer, or cut by a stop string, is truncated at the first differing token and the
canonical tail computed, so the next turn reuses all of it and recomputes nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from djinn.engine import GenerateRequest, SamplingParams
from djinn.errors import CapacityError, Cancelled, DjinnError
from djinn.server.http.config import HttpConfig
from djinn.server.http.errors import APIError, bad_request, not_found
from djinn.server.http.outcome import Outcome
from djinn.server.http.render import Renderer
from djinn.server.http.sessions import Conversation, SessionIndex, common_prefix
from djinn.server.http.toolcalls import ToolCall, parse
from djinn.server.http.validate import ChatRequest
from djinn.server.journal import HTTP_OWNER

log = logging.getLogger("djinn.http")
# A diverging request forks the conversation it repeats only when they share at least this many
# tokens past the system prompt (a KV block): every conversation of a key shares the next role
# header, which is no history worth a fork (whole blocks of it are shared anyway, engine-wide)
FORK_MIN_SHARED = 16
_DONE = object()


@dataclass
class Turn:
    """A turn in flight. ``tokens`` receives generated token ids (then ``_DONE``) when streaming."""

    conv: Conversation
    task: asyncio.Task | None = None
    tokens: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: stop at the next token; the session keeps its last complete turn."""
        self.cancelled.set()


class Frontend:
    def __init__(self, engine, config: HttpConfig, metrics=None, journal=None):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.journal = journal        # server/journal.py: conversations survive a restart
        self.index = SessionIndex(config.idempotency_entries)
        self._renderers: dict[str, Renderer] = {}
        self._grammars: dict[str, object] = {}
        self._grammar_lock = threading.Lock()
        self.waiting = 0

    # ---- per model ---------------------------------------------------------------------
    def runtime(self, model: str):
        rt = self.engine.runtimes.get(model)
        if rt is None:
            raise not_found(f"model {model!r} is not served here; GET /v1/models lists those that are",
                            param="model", code="model_not_found")
        return rt

    def renderer(self, model: str) -> Renderer:
        if model not in self._renderers:
            self._renderers[model] = Renderer(self.runtime(model).tokenizer)
        return self._renderers[model]

    def grammars(self, model: str):
        from djinn.server.http.grammar import ToolGrammars

        with self._grammar_lock:
            if model not in self._grammars:
                rt = self.runtime(model)
                vocab = rt.loaded.model.get_output_embeddings().weight.shape[0]
                self._grammars[model] = ToolGrammars(rt.tokenizer, vocab, rt.eos_ids())
            return self._grammars[model]

    async def call(self, fn, *args, **kwargs):
        """An engine (or other blocking) call, off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ---- the journal -------------------------------------------------------------------
    def adopt_journaled(self) -> int:
        """Index the conversations the journal restored into the engine (before serving): the
        tokens are the engine session's own, the rest the front end's last note. Returns how many."""
        if self.journal is None:
            return 0
        notes = self.journal.conversations()
        n = 0
        # read on the engine loop: a native client may be opening sessions meanwhile
        for sid, s in self.engine.loop.call(lambda: list(self.engine.sessions.items())):
            if not (s.owner or "").startswith(HTTP_OWNER) or sid in self.index.by_id:
                continue
            note = notes.get(sid, {})
            conv = Conversation(id=sid, owner=s.owner, model=s.model, namespace=note.get("namespace"),
                                tokens=list(s.tokens), finish_reason=note.get("finish_reason"),
                                turns=int(note.get("turns", s.turns)))
            self.index.add(conv)
            self.index.issue_calls(conv, list(note.get("issued_calls", [])))
            conv.pending_calls = set(note.get("pending_calls", []))
            n += 1
        return n

    @staticmethod
    def _note(conv: Conversation) -> dict:
        return {"namespace": conv.namespace, "issued_calls": list(conv.issued_calls),
                "pending_calls": sorted(conv.pending_calls), "finish_reason": conv.finish_reason, "turns": conv.turns}

    # ---- sessions ----------------------------------------------------------------------
    async def close(self, conv: Conversation) -> None:
        self.index.remove(conv.id)
        try:
            await self.call(self.engine.close_session, conv.id, conv.owner)
        except DjinnError:
            pass

    async def _close_quietly(self, conv: Conversation) -> None:
        try:
            await self.call(self.engine.close_session, conv.id, conv.owner)
        except DjinnError:
            pass

    def _victims(self, owner: str | None = None, spare: Conversation | None = None) -> list[Conversation]:
        """Idle sessions, best eviction victim first: a finished reply (a person is reading it)
        before a session waiting on a short tool call, then least recently used."""
        idle = [c for c in self.index.by_id.values()
                if c is not spare and not c.lock.locked() and (owner is None or c.owner == owner)]
        return sorted(idle, key=lambda c: (c.finish_reason == "tool_calls" or bool(c.pending_calls), c.last_used))

    async def _room_for_one(self, owner: str, spare: Conversation | None = None) -> None:
        """Close the owner's best idle victims (never ``spare``) until one more session fits."""
        mine = self.index.owned(owner)
        if len(mine) >= self.config.max_sessions_per_key:
            for victim in self._victims(owner, spare)[: len(mine) - self.config.max_sessions_per_key + 1]:
                await self.close(victim)

    async def _new_session(self, owner: str, req: ChatRequest) -> Conversation:
        await self._room_for_one(owner)
        sid = await self.call(self.engine.open_session, req.model, owner)
        conv = Conversation(id=sid, owner=owner, model=req.model, namespace=req.namespace)
        self.index.add(conv)
        return conv

    async def _fork_session(self, owner: str, req: ChatRequest, parent: Conversation,
                            overlap: int) -> Conversation | None:
        """Fork-on-divergence: a request that repeats the start of ``parent``'s conversation and
        then differs (an edited message, a sub-agent given its parent's history) gets a fork of
        ``parent`` cut back to the ``overlap`` tokens they share: the shared KV is referenced,
        not copied or recomputed, and ``parent`` keeps its own history. None when ``parent``
        became busy or went away meanwhile (the caller opens a new session instead)."""
        if parent.lock.locked() or self.index.by_id.get(parent.id) is not parent:
            return None
        await self._room_for_one(owner, spare=parent)
        async with parent.lock:
            try:
                child = (await self.call(self.engine.fork, parent.id, owner))["session_id"]
            except DjinnError as exc:            # e.g. no room for the fork's private blocks
                log.info("fork of %s for a diverging request failed (%s): opening a new session", parent.id, exc)
                return None
            await self.call(self.engine.truncate, child, overlap, owner)
        conv = Conversation(id=child, owner=owner, model=req.model, namespace=req.namespace,
                            tokens=parent.tokens[:overlap])
        self.index.add(conv)
        return conv

    # ---- a turn ------------------------------------------------------------------------
    async def start(self, owner: str, req: ChatRequest, stream: bool,
                    session: Conversation | None = None, how: str | None = None) -> Turn:
        """Match the request to a session and start generating. Errors here are the client's."""
        rt = self.runtime(req.model)
        renderer = self.renderer(req.model)
        conv = session
        if conv is None and req.session:
            conv, how = self.index.get(owner, req.session), "header"
        if conv is None:
            conv = self.index.by_tool_results(owner, req.messages)
            how = "tool_call_ids" if conv else None
        if conv is not None:
            self.index.check_model(conv, req.model)
            if conv.pending_calls and not conv.lock.locked():
                # the agent is back from its tool: bring the KV home before rendering anything
                conv.pending_calls = set()
                await self.call(self.engine.signal_phase, conv.id, "ACTIVE", owner)
        if self.waiting >= self.config.max_waiting:
            raise APIError(429, f"{self.waiting} turns are already waiting; retry shortly", "rate_limit_error",
                           code="server_busy")
        processor = None
        if req.tool_choice not in ("none", "auto"):
            grammars = await self.call(self.grammars, req.model)
            processor = await self.call(grammars.processor, req.tools, req.tool_choice, req.parallel_tool_calls)
        prompt = await self.call(renderer.prompt, req)
        limit = rt.max_context
        if len(prompt) >= limit:
            raise APIError(400, f"the conversation is {len(prompt)} tokens; this model's context is {limit}. "
                           "Shorten the messages.", param="messages", code="context_length_exceeded")
        max_tokens = req.sampling.max_tokens
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, limit - len(prompt))
        elif len(prompt) + max_tokens > limit:
            raise APIError(400, f"the conversation ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds "
                           f"this model's context of {limit}; lower max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        overlap, parent = 0, None
        if conv is None:
            system_prefix = await self.call(renderer.system_prefix, req, prompt)
            conv, overlap, parent = self.index.by_prefix(owner, req.model, req.namespace, prompt, system_prefix)
            how = "prefix" if conv else None
        if conv is None and parent is not None and overlap - system_prefix >= FORK_MIN_SHARED:
            conv = await self._fork_session(owner, req, parent, overlap)
            how = "fork" if conv else None
        if conv is None:
            conv, how = await self._new_session(owner, req), "new"
        await conv.lock.acquire()
        try:
            turn = Turn(conv)
            keep = common_prefix(conv.tokens, prompt)
            if keep == len(prompt):
                keep -= 1                    # the last prompt token's logits are needed: compute it again
            truncated = keep < len(conv.tokens)
            if truncated:                    # a diverging history: never reuse KV that does not match
                await self.call(self.engine.truncate, conv.id, keep, owner)
                conv.tokens = conv.tokens[:keep]
            where = (await self.call(self.engine.session_info, conv.id, owner)).get("kv_location")
            params = SamplingParams(max_new_tokens=max_tokens, temperature=req.sampling.temperature,
                                    top_p=req.sampling.top_p, seed=req.sampling.seed, stop=list(req.sampling.stop))
            info = {"session_id": conv.id, "matched_by": how, "kv_before": where,
                    "truncated_at": keep if truncated else None, "diverged_overlap": overlap or None}
            if stream:
                turn.tokens = asyncio.Queue()
            gen = GenerateRequest(prompt[keep:], params, logits_processor=processor,
                                  on_token=self._token_sink(turn, asyncio.get_running_loop()))
        except BaseException:
            conv.lock.release()
            raise
        self.waiting += 1
        turn.task = asyncio.create_task(self._run(turn, req, prompt, gen, info))
        turn.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return turn

    @staticmethod
    def _token_sink(turn: Turn, loop: asyncio.AbstractEventLoop):
        def on_token(tok: int) -> None:                # runs on the engine loop thread
            if turn.cancelled.is_set():
                raise Cancelled("the client disconnected")
            if turn.tokens is not None:
                loop.call_soon_threadsafe(turn.tokens.put_nowait, tok)
        return on_token

    async def _generate(self, turn: Turn, gen: GenerateRequest):
        sent = []
        inner = gen.on_token
        gen.on_token = lambda t: (inner(t), sent.append(t))
        for attempt in range(4):
            try:
                return await self.call(self.engine.generate, turn.conv.id, gen, turn.conv.owner)
            except CapacityError:
                victims = self._victims(spare=turn.conv)
                if sent or attempt == 3 or not victims:
                    raise
                await self.close(victims[0])   # its client resends the conversation: only recompute is lost

    async def _run(self, turn: Turn, req: ChatRequest, prompt: list[int], gen: GenerateRequest, info: dict) -> Outcome:
        conv, owner = turn.conv, turn.conv.owner
        try:
            try:
                result = await self._generate(turn, gen)
            finally:
                self.waiting -= 1
            names = {t["name"] for t in req.tools}
            cut = result.finish_reason == "length"
            content, calls = parse(result.text, names, req.tool_choice, truncated=cut)
            tool_calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=n, arguments=a) for n, a in calls]
            # why generation stopped, as OpenAI reports it: max_tokens is "length" even when
            # complete calls came before the one it cut (those are returned, the cut one is not)
            finish = "length" if cut else "tool_calls" if tool_calls else result.finish_reason
            reply = {"role": "assistant", "content": content or "",
                     "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in tool_calls]}
            if not tool_calls:
                reply.pop("tool_calls")
            history = prompt + result.token_ids
            conv.tokens = history
            repaired = await self._match_next_render(conv, req, reply, history)
            if tool_calls:
                self.index.issue_calls(conv, [c.id for c in tool_calls])
                await self.call(self.engine.signal_phase, conv.id, "IO_WAIT", owner)
            conv.turns += 1
            conv.finish_reason = finish
            conv.last_used = time.monotonic()
            restored = result.timings.get("restore_ms", 0.0) > 0 or info["kv_before"] == "host"
            kv = "restored" if restored else "resident" if result.cached_tokens else \
                ("recomputed" if info["matched_by"] != "new" else "new")
            djinn = {**info, "kv": kv, "computed_tokens": result.computed_tokens, "repair_tokens": repaired,
                     "timings": {k: round(v, 3) for k, v in result.timings.items()}}
            djinn.pop("kv_before")
            out = Outcome(model=req.model, session_id=conv.id, content=content, tool_calls=tool_calls,
                          finish_reason=finish, prompt_tokens=len(prompt), completion_tokens=len(result.token_ids),
                          cached_tokens=result.cached_tokens, djinn=djinn)
            if self.metrics is not None:
                self.metrics.turn(result, out)
            if self.journal is not None:       # under the session's lock: no close can interleave
                await self.call(self.journal.note, conv.id, self._note(conv))
            return out
        except BaseException:
            if conv.turns == 0 and info["matched_by"] == "new":
                self.index.remove(conv.id)        # a session no reply ever came from: nothing to keep
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(self._close_quietly(conv)))
            raise
        finally:
            conv.lock.release()
            if turn.tokens is not None:
                turn.tokens.put_nowait(_DONE)

    async def _match_next_render(self, conv: Conversation, req: ChatRequest, reply: dict, history: list[int]) -> int:
        """Make the session's history the tokens the next request renders; returns tokens computed."""
        expected = await self.call(self.renderer(req.model).with_reply, req, reply)
        d = common_prefix(history, expected)
        if d == len(history) == len(expected):
            return 0
        try:
            await self.call(self.engine.truncate, conv.id, d, conv.owner)
            conv.tokens = history[:d]
            tail = expected[d:]
            if not tail:
                return 0
            # prefill the canonical tail; the one token sampled after it is dropped again
            r = await self.call(self.engine.generate, conv.id,
                                GenerateRequest(tail, SamplingParams(max_new_tokens=1, ignore_eos=True)), conv.owner)
            await self.call(self.engine.truncate, conv.id, len(expected), conv.owner)
            conv.tokens = list(expected)
            return r.computed_tokens
        except DjinnError as exc:             # e.g. no room: the session keeps its matching prefix only
            log.info("session %s: could not extend to the next turn's rendering: %s", conv.id, exc)
            return 0


def is_done(item) -> bool:
    return item is _DONE
