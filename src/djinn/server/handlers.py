"""What each op does: a validated request in, an engine call, a reply out.

Every function takes the request context and the request as normalised by
``djinn.protocol.validate_request`` (so every field is present and in range; the engine
still checks what only it can know: layers of this model, token ids of this vocabulary,
who owns a session) and returns ``(reply fields, reply tensors)``. Payload tensors are
referred to by index on the wire and by value here. Errors are raised as typed
``djinn.errors`` and become error replies in the connection.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import torch

import djinn
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.engine.sampling import SamplingParams
from djinn.errors import InvalidRequest, SessionNotFound
from djinn.protocol import PROTOCOL_VERSION
from djinn.protocol.messages import FILENAME
from djinn.server.gateway import EngineCall

if TYPE_CHECKING:  # pragma: no cover
    from djinn.server.native import NativeServer

Reply = tuple[dict[str, Any], list[torch.Tensor]]


@dataclass
class RequestContext:
    server: "NativeServer"
    conn: int                 # connection id
    owner: str                # the principal (server/auth.py)
    call: EngineCall          # this request's engine call (cancellable while queued)

    async def engine(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.server.gateway.call(fn, *args, record=self.call, **kwargs)

    async def work(self, fn: Callable[..., Any], *args: Any, turn: bool = False, **kwargs: Any) -> Any:
        """A compute request: admitted into the engine's bounded queue (a generate ``turn`` also
        into the bounded running set until it ends), or CapacityError at once."""
        ticket = self.server.admission.admit(turn)
        try:
            return await self.server.gateway.call(fn, *args, record=self.call, ticket=ticket, **kwargs)
        finally:
            ticket.finish()

    def hold(self, session_id: str) -> None:
        self.server.leases.hold(session_id, self.owner, self.conn)


# ---- conversions -------------------------------------------------------------------------
def interventions(items: Sequence[dict], tensors: Sequence[torch.Tensor]) -> list[dict]:
    """The engine's intervention dicts: an ``add``'s vector index becomes the tensor."""
    return [{**x, "vector": tensors[x["vector"]]} if x["kind"] == "add" else dict(x) for x in items]


def generate_request(req: dict, tensors: Sequence[torch.Tensor]) -> GenerateRequest:
    params = SamplingParams(max_new_tokens=req["max_new_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                            top_k=req["top_k"], seed=req["seed"], stop=list(req["stop"]),
                            stop_token_ids=list(req["stop_token_ids"]), ignore_eos=req.get("ignore_eos", False))
    bp = req["breakpoint"]
    return GenerateRequest(prompt=req["prompt"], params=params, chat=req["chat"],
                           interventions=interventions(req["interventions"], tensors), capture=list(req["capture"]),
                           breakpoint=None if bp is None else (bp["layer"], bp["step"]))


def generation_reply(result: GenerateResult, queued_s: float = 0.0) -> dict[str, Any]:
    timings = {k: float(v) for k, v in result.timings.items()}
    # the engine measures its queue from when our call reached its loop; the wait in the
    # loop's queue happened before that, so it is added here
    for key in ("queue_ms", "total_ms"):
        if key in timings:
            timings[key] += queued_s * 1e3
    return {"token_ids": list(result.token_ids), "text": result.text, "finish_reason": result.finish_reason,
            "timings": timings, "captured": {str(k): v for k, v in result.captured.items()}, "paused": result.paused,
            "prompt_tokens": result.prompt_tokens, "cached_tokens": result.cached_tokens,
            "computed_tokens": result.computed_tokens, **({"session_id": result.session_id} if result.session_id else {})}


def _resumed(reply: dict, queued_s: float) -> dict:
    if reply.get("generation") is not None:
        return {"generation": generation_reply(reply["generation"], queued_s)}
    return {k: v for k, v in reply.items() if v is not None}


def _hold_refs(ctx: RequestContext, reply: dict) -> None:
    """A resume names no session; the tensors it hands back do."""
    for key in ("logits", "paused"):
        ref = reply.get(key)
        if ref:
            ctx.hold((ref.get("activation") or ref)["session_id"])


def model_files(loaded: Any) -> dict[str, bytes]:
    """The tokenizer as the files ``save_pretrained`` writes (tokenizer.json, its config, a
    chat template): plain data the client rebuilds a fast tokenizer from, never pickled."""
    with tempfile.TemporaryDirectory(prefix="djinn-tok-") as tmp:
        loaded.tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())
                if p.is_file() and FILENAME.fullmatch(p.name)}


def model_config(loaded: Any) -> dict[str, Any]:
    return json.loads(loaded.config.to_json_string(use_diff=False))


# ---- ops ---------------------------------------------------------------------------------
async def op_hello(ctx: RequestContext, req: dict, tensors) -> Reply:
    raise InvalidRequest("this connection already said hello; send it once, as the first message")


async def op_model_info(ctx: RequestContext, req: dict, tensors) -> Reply:
    return await ctx.server.model_info(req["model"]), []


async def op_session_open(ctx: RequestContext, req: dict, tensors) -> Reply:
    engine, sid = ctx.server.engine, req["session_id"]
    if sid is None:
        def open_within_limit() -> str:   # on the engine loop: counting and opening are one step
            ctx.server.admission.check_sessions(sum(1 for s in engine.sessions.values() if s.owner == ctx.owner))
            return engine.open_session(req["model"], owner=ctx.owner)

        sid = await ctx.engine(open_within_limit)
    else:
        if ctx.server.leases.expiring(sid):
            raise SessionNotFound(f"session {sid}: its lease ended and it was closed; open a new session")
        info = await ctx.engine(engine.session_info, sid, owner=ctx.owner)
        if info["model"] != req["model"]:
            raise InvalidRequest(f"session {sid} is a session of {info['model']!r}, not {req['model']!r}")
    ctx.hold(sid)
    return {"session_id": sid}, []


async def op_generate(ctx: RequestContext, req: dict, tensors) -> Reply:
    ctx.server.admission.check_tokens(req["prompt"], req["max_new_tokens"])
    result = await ctx.work(ctx.server.engine.submit_generate, req["session_id"], generate_request(req, tensors),
                            turn=True, owner=ctx.owner)
    ctx.hold(req["session_id"])
    return generation_reply(result, ctx.call.queued_s), []


async def op_signal_phase(ctx: RequestContext, req: dict, tensors) -> Reply:
    await ctx.engine(ctx.server.engine.signal_phase, req["session_id"], req["phase"], owner=ctx.owner)
    ctx.hold(req["session_id"])
    return {}, []


async def op_forward(ctx: RequestContext, req: dict, tensors) -> Reply:
    ids = req["input_ids"]
    ids = tensors[ids] if isinstance(ids, int) else ids
    reply = await ctx.work(ctx.server.engine.forward, req["session_id"], ids, req["breakpoint"],
                             interventions(req.get("interventions", []), tensors), owner=ctx.owner)
    ctx.hold(req["session_id"])
    return reply, []


async def op_resume(ctx: RequestContext, req: dict, tensors) -> Reply:
    act = req["activation"]
    if isinstance(act, int):
        act = tensors[act]
    reply = await ctx.work(ctx.server.engine.resume, req["paused_id"], act, list(tensors), owner=ctx.owner)
    out = _resumed(reply, ctx.call.queued_s)
    _hold_refs(ctx, out)
    return out, []


async def op_fetch(ctx: RequestContext, req: dict, tensors) -> Reply:
    value = await ctx.work(ctx.server.engine.fetch, req["tensor_id"], req["expr"], list(tensors), owner=ctx.owner)
    size = value.numel() * value.element_size()
    limit = ctx.server.config.max_message_bytes
    if size + 4096 > limit:
        raise InvalidRequest(f"the tensor is {size} bytes, more than this server's message limit of {limit} bytes; "
                             "fetch it in slices (e.g. t[:n].fetch()) or raise --max-message-size")
    return {"tensor": 0}, [value]


async def op_release(ctx: RequestContext, req: dict, tensors) -> Reply:
    await ctx.engine(ctx.server.engine.release, req["tensor_id"], owner=ctx.owner)
    return {}, []


async def op_fork(ctx: RequestContext, req: dict, tensors) -> Reply:
    reply = await ctx.engine(ctx.server.engine.fork, req["session_id"], owner=ctx.owner)
    ctx.hold(req["session_id"])
    ctx.hold(reply["session_id"])
    return {k: v for k, v in reply.items() if v is not None}, []


async def op_close(ctx: RequestContext, req: dict, tensors) -> Reply:
    await ctx.engine(ctx.server.engine.close_session, req["session_id"], owner=ctx.owner)
    ctx.server.leases.forget(req["session_id"])
    return {}, []


async def op_session_info(ctx: RequestContext, req: dict, tensors) -> Reply:
    info = await ctx.engine(ctx.server.engine.session_info, req["session_id"], owner=ctx.owner)
    ctx.hold(req["session_id"])
    return {"info": info}, []


async def op_stats(ctx: RequestContext, req: dict, tensors) -> Reply:
    stats = await ctx.engine(ctx.server.engine.stats)
    return {"stats": {**stats, "server": ctx.server.stats()}}, []


async def op_echo(ctx: RequestContext, req: dict, tensors) -> Reply:
    data = req.get("data", [])
    return {"data": list(range(len(data)))}, [tensors[i] for i in data]


OPS: dict[str, Callable[[RequestContext, dict, list], Awaitable[Reply]]] = {
    "hello": op_hello, "model_info": op_model_info, "session_open": op_session_open, "generate": op_generate,
    "signal_phase": op_signal_phase, "forward": op_forward, "resume": op_resume, "fetch": op_fetch,
    "release": op_release, "fork": op_fork, "close": op_close, "session_info": op_session_info,
    "stats": op_stats, "echo": op_echo,
    # "cancel" is answered by the connection itself: it acts on the connection's other requests
}


def hello_reply(server: "NativeServer") -> dict[str, Any]:
    return {"server_version": djinn.__version__, "protocol_version": PROTOCOL_VERSION,
            "models": list(server.engine.runtimes), "max_message_bytes": server.config.max_message_bytes}
