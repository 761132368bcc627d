"""The ASGI app: routes, API keys, body limits and error mapping of the OpenAI-compatible API.

``create_app(engine, config)`` drives an in-process ``djinn.engine.Engine``. Routes parse bodies
themselves (``validate``) so every refusal is an OpenAI-style error naming the field; no
traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from djinn.errors import DjinnError
from djinn.server.http import validate
from djinn.server.http.config import HttpConfig
from djinn.server.http.errors import APIError, body as error_body, from_djinn
from djinn.server.http.metrics import Metrics
from djinn.server.http.outcome import chunk, error_event, replay_chunks, tail_chunks
from djinn.server.http.turns import Frontend, is_done

log = logging.getLogger("djinn.http")
SESSION_HEADER = "x-djinn-session"


def _http_config(config) -> HttpConfig:
    if isinstance(config, HttpConfig):
        return config
    http = getattr(config, "http", None)
    if isinstance(http, HttpConfig):
        return http
    token = getattr(getattr(config, "server", None), "token", None)
    return HttpConfig(api_keys=[token] if token else None)


RETRY_AFTER_S = 1     # seconds a 429 asks the client to wait: about one turn of a loaded server


def owner_of(key: str) -> str:
    """Sessions are scoped by a digest of the API key (the key itself is never kept)."""
    return "http:" + hashlib.sha256(key.encode()).hexdigest()[:24]


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}", code="body_too_large")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the body nests arrays and objects more than {validate.MAX_DEPTH} deep",
                       code="too_deep") from None
    validate.check_body(body)
    return bytes(raw), body


def create_app(engine, config=None, journal=None) -> FastAPI:
    """The OpenAI-compatible API over ``engine``. ``config``: a djinn ``Config`` (its
    ``server.token`` is the API key) or an ``HttpConfig``. ``journal``: a
    ``server.journal.Journal`` the engine is attached to: conversations are noted there after
    each turn, and those it restored into the engine are adopted now (they survive a restart)."""
    cfg = _http_config(config)
    metrics = Metrics(engine)
    fe = Frontend(engine, cfg, metrics, journal=journal)
    fe.adopt_journaled()
    app = FastAPI(title="Djinn OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.frontend = fe
    started = int(time.time())

    def _reply(err: APIError) -> JSONResponse:
        # over capacity: tell clients (and the OpenAI SDK's retry logic) when to come back
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else None
        return JSONResponse(error_body(err), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _reply(exc)

    @app.exception_handler(DjinnError)
    async def _djinn_error(request: Request, exc: DjinnError):
        return _reply(from_djinn(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error_body(err), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        err = APIError(500, "internal error in Djinn; the server log has the details", "server_error", code="internal")
        return JSONResponse(error_body(err), status_code=500)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    def auth(request: Request) -> str:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if cfg.api_keys is not None:
            if not key or not any(hmac.compare_digest(key.encode(), k.encode()) for k in cfg.api_keys):
                raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                               "authentication_error", code="invalid_api_key")
        return owner_of(key)

    app.state.auth = auth

    # ---- chat completions ---------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        owner = auth(request)
        raw, body = await read_json(request, cfg.max_body_bytes)
        key = idempotency_key(request, owner, raw)
        replay = await remembered(fe, request, key)
        stream = isinstance(body, dict) and body.get("stream") is True
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        if replay is not None:
            return respond_outcome(replay, stream, include_usage)
        req = validate.chat_request(body, request.headers.get(SESSION_HEADER))
        turn = await fe.start(owner, req, stream)
        track(fe, key, turn)
        headers = {"x-djinn-session-id": turn.conv.id}
        if not stream:
            out = await turn.task
            return JSONResponse(out.completion(), headers=headers)
        rt = fe.runtime(req.model)
        return StreamingResponse(sse(turn, req, rt.tokenizer), media_type="text/event-stream", headers=headers)

    # ---- models, health, metrics ------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": started, "owned_by": "djinn"}
                                           for n in engine.runtimes]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        auth(request)
        fe.runtime(name)
        return {"id": name, "object": "model", "created": started, "owned_by": "djinn"}

    @app.get("/health")
    async def health():
        alive = engine.loop._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "models": list(engine.runtimes)},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(await fe.call(metrics.render), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- Djinn's sessions ---------------------------------------------------------------
    async def describe(conv) -> dict:
        info = await fe.call(engine.session_info, conv.id, conv.owner)
        return {"id": conv.id, "object": "djinn.session", "model": conv.model, "phase": info["phase"],
                "kv_location": info["kv_location"], "kv_bytes": info["kv_bytes"], "tokens": info["tokens"],
                "kv_tokens": info["kv_tokens"], "turns": conv.turns, "last_finish_reason": conv.finish_reason,
                "pending_tool_calls": sorted(conv.pending_calls), "namespace": conv.namespace,
                "busy": conv.lock.locked()}

    @app.get("/v1/sessions")
    async def sessions(request: Request):
        owner = auth(request)
        return {"object": "list", "data": [await describe(c) for c in fe.index.owned(owner)]}

    @app.get("/v1/sessions/{sid}")
    async def session(sid: str, request: Request):
        return await describe(fe.index.get(auth(request), sid))

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str, request: Request):
        conv = fe.index.get(auth(request), sid)
        async with conv.lock:
            await fe.close(conv)
        return {"id": sid, "object": "djinn.session.deleted", "deleted": True}

    from djinn.server.http.responses import add_routes

    add_routes(app, fe, auth)
    return app


# ---- retries --------------------------------------------------------------------------
def idempotency_key(request: Request, owner: str, raw: bytes) -> tuple[str, str]:
    explicit = request.headers.get("idempotency-key")
    if explicit:
        return owner, "key:" + explicit
    return owner, request.url.path + ":" + hashlib.sha256(raw).hexdigest()


async def remembered(fe: Frontend, request: Request, key: tuple[str, str]):
    """The outcome of the same request already answered, when this one is a client's retry."""
    try:
        retry = int(request.headers.get("x-stainless-retry-count") or 0) > 0
    except ValueError:
        retry = False
    if not retry and not request.headers.get("idempotency-key"):
        return None
    if key in fe.index.done:
        return fe.index.done[key]
    pending = fe.index.inflight.get(key)
    if pending is not None:
        try:
            return await asyncio.shield(pending)
        except BaseException:
            return None
    return None


def track(fe: Frontend, key: tuple[str, str], turn) -> None:
    """Remember the turn's outcome for retries, whether or not its client stays to read it."""
    fut = asyncio.get_running_loop().create_future()
    fe.index.inflight[key] = fut

    def done(task: asyncio.Task) -> None:
        fe.index.inflight.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            fe.index.remember(key, task.result())
            fut.set_result(task.result())
        else:
            fut.set_result(None)

    turn.task.add_done_callback(done)


def respond_outcome(out, stream: bool, include_usage: bool):
    headers = {"x-djinn-session-id": out.session_id}
    if stream:
        async def again():
            for line in replay_chunks(out, include_usage):
                yield line
        return StreamingResponse(again(), media_type="text/event-stream", headers=headers)
    return JSONResponse(out.completion(), headers=headers)


# ---- streaming ------------------------------------------------------------------------
async def sse(turn, req, tokenizer):
    """Server-sent events of one turn; the client leaving cancels the turn at its next token."""
    from djinn.server.http.toolcalls import Splitter

    head = {"id": "chatcmpl-" + turn.conv.id[:8] + hex(id(turn))[-8:], "created": int(time.time()), "model": req.model}
    splitter = Splitter({t["name"] for t in req.tools}, req.tool_choice, req.sampling.stop)
    finished = False
    try:
        yield chunk(head, {"role": "assistant", "content": ""})
        out: list[int] = []
        while True:
            item = await turn.tokens.get()
            if is_done(item):
                break
            out.append(item)
            new = splitter.safe(tokenizer.decode(out, skip_special_tokens=True))
            if new:
                yield chunk(head, {"content": new})
        try:
            outcome = await turn.task
        except APIError as exc:
            finished = True
            yield error_event(error_body(exc))
            return
        except DjinnError as exc:
            finished = True
            yield error_event(error_body(from_djinn(exc)))
            return
        outcome.id, outcome.created = head["id"], head["created"]
        rest = splitter.rest(outcome.content)
        if rest:
            yield chunk(outcome, {"content": rest})
        for line in tail_chunks(outcome, req.include_usage):
            yield line
        finished = True
    finally:
        if not finished:
            turn.cancel()
