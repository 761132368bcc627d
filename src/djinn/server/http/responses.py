"""``/v1/responses``: the Responses API over the same sessions as chat completions.

A stored response (``store`` defaults to true) is a Djinn session: ``previous_response_id``
continues that session's KV and conversation; ``GET``/``DELETE /v1/responses/{id}`` read and
forget it. ``store: false`` keeps nothing: a session opened for such a response closes after it.
With a journal (``djinn serve --journal``) stored responses are journaled too (server/journal.py)
and loaded again at start for the sessions the journal restored, so they survive a restart.
Streaming is not offered here yet and is refused with a 400, like every field Djinn would ignore.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from djinn.server.http import validate
from djinn.server.http.errors import bad_request, not_found
from djinn.server.http.outcome import Outcome, new_id

FIELDS = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "previous_response_id",
          "store", "max_output_tokens", "temperature", "top_p", "metadata", "user", "prompt_cache_key",
          "djinn_session"}
OFF = {"stream": (False, None), "truncation": ("disabled", None), "text": (None, {"format": {"type": "text"}}),
       "reasoning": (None,), "include": (None, []), "background": (False, None), "service_tier": (None, "auto"),
       "conversation": (None,), "top_logprobs": (None, 0), "prompt": (None,), "max_tool_calls": (None,),
       "safety_identifier": (None,), "stream_options": (None,)}


@dataclass
class Stored:
    owner: str
    session_id: str
    messages: list[dict]          # the conversation after this response, without instructions
    obj: dict


def _items(raw) -> list[dict]:
    """Responses input items to chat messages (function calls and outputs included)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad_request("input must be a string or a non-empty list of items", param="input")
    out: list[dict] = []
    for i, item in enumerate(raw):
        w = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{w} must be an object", param=w)
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": item.get("content")})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise bad_request(f"{w}: a function_call needs call_id, name and arguments strings", param=w)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            prev = out[-1] if out else None
            if prev is not None and prev["role"] == "assistant" and i > 0 and raw[i - 1].get("type") == "function_call":
                prev["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad_request(f"{w}: a function_call_output needs a call_id", param=w)
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, (str, list)) else None})
        else:
            raise bad_request(f"{w}: input items of type {kind!r} are not supported", param=w)
    return out


def _as_openai(msgs: list[dict]) -> list[dict]:
    """Normalised messages back to the chat wire shape (to validate them together with new input)."""
    out = []
    for m in msgs:
        if m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": m["content"] or None,
                        "tool_calls": [{"id": c["id"], "type": "function",
                                        "function": {"name": c["name"], "arguments": c["arguments"]}}
                                       for c in m["tool_calls"]]})
        else:
            out.append(dict(m))
    return out


def _output(out: Outcome) -> list[dict]:
    items = []
    if out.content:
        items.append({"type": "message", "id": new_id("msg"), "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": out.content, "annotations": []}]})
    for c in out.tool_calls:
        items.append({"type": "function_call", "id": new_id("fc"), "call_id": c.id, "name": c.name,
                      "arguments": c.arguments, "status": "completed"})
    return items


def add_routes(app: FastAPI, fe, auth) -> None:
    from djinn.server.http.app import SESSION_HEADER, read_json

    store: dict[str, Stored] = {}
    app.state.responses = store
    journal = fe.journal
    if journal is not None:      # before serving: those of the conversations the journal restored
        for row in journal.responses():
            conv = fe.index.by_id.get(row["session_id"])
            if conv is None or conv.owner != row["owner"]:
                continue          # its session was not restored (model not loaded now): kept on disk
            store[row["id"]] = Stored(owner=row["owner"], session_id=conv.id, messages=row["messages"], obj=row["obj"])
            conv.responses.add(row["id"])

    def lookup(owner: str, rid: str) -> Stored:
        s = store.get(rid)
        if s is None or s.owner != owner:
            raise not_found(f"no stored response {rid!r}: it never existed, was not stored, was deleted, "
                            "or belongs to another key", param="previous_response_id", code="response_not_found")
        return s

    @app.post("/v1/responses")
    async def create(request: Request):
        owner = auth(request)
        _, body = await read_json(request, fe.config.max_body_bytes)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        validate.reject_unknown(body, FIELDS, OFF)
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise bad_request("model is required", param="model")
        keep = body.get("store", True)
        if not isinstance(keep, bool):
            raise bad_request("store must be a boolean", param="store")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise bad_request("metadata must be an object of strings", param="metadata")
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise bad_request("instructions must be a string", param="instructions")
        prev_id = body.get("previous_response_id")
        prior, history = None, []
        if prev_id is not None:
            if not isinstance(prev_id, str):
                raise bad_request("previous_response_id must be a string", param="previous_response_id")
            prev = lookup(owner, prev_id)
            history = _as_openai(prev.messages)
            prior = fe.index.by_id.get(prev.session_id)
            if prior is not None and prior.owner != owner:
                prior = None
        new_msgs = _items(body.get("input"))
        head = [{"role": "system", "content": instructions}] if instructions else []
        messages = validate.messages(head + history + new_msgs)
        tools = validate.tools(body.get("tools"), flat=True)
        ptc = body.get("parallel_tool_calls")
        if ptc is not None and not isinstance(ptc, bool):
            raise bad_request("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
        req = validate.ChatRequest(
            model=body["model"], messages=messages, tools=tools,
            tool_choice=validate.tool_choice(body.get("tool_choice"), tools, flat=True),
            parallel_tool_calls=ptc is not False, sampling=validate.sampling(body, "max_output_tokens"),
            session=validate.session_field(body, request.headers.get(SESSION_HEADER)),
            namespace=validate.namespace(body))
        if req.session and prior is not None and req.session != prior.id:
            raise bad_request("X-Djinn-Session and previous_response_id name different sessions",
                              param="previous_response_id")
        turn = await fe.start(owner, req, stream=False, session=prior if not req.session else None,
                              how="previous_response_id" if prior is not None and not req.session else None)
        out: Outcome = await turn.task
        rid = new_id("resp")
        obj = {
            "id": rid, "object": "response", "created_at": int(time.time()),
            "status": "incomplete" if out.finish_reason == "length" else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if out.finish_reason == "length" else None,
            "error": None, "model": req.model, "instructions": instructions, "output": _output(out),
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": prev_id, "store": keep,
            "temperature": req.sampling.temperature, "top_p": req.sampling.top_p,
            "tool_choice": body.get("tool_choice") or ("auto" if tools else "none"), "tools": body.get("tools") or [],
            "max_output_tokens": req.sampling.max_tokens, "metadata": metadata, "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": {"input_tokens": out.prompt_tokens, "input_tokens_details": {"cached_tokens": out.cached_tokens},
                      "output_tokens": out.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
            "djinn": out.djinn,
        }
        conv = turn.conv
        if keep:
            reply = {"role": "assistant", "content": out.content or "",
                     "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in out.tool_calls]}
            if not out.tool_calls:
                reply.pop("tool_calls")
            convo = [m for m in messages[len(head):]] + [reply]
            store[rid] = Stored(owner=owner, session_id=conv.id, messages=convo, obj=obj)
            conv.responses.add(rid)
            if journal is not None:
                await fe.call(journal.note_response, rid, owner, conv.id, convo, obj)
        elif out.djinn.get("matched_by") == "new" and conv.id in fe.index.by_id:
            async with conv.lock:
                await fe.close(conv)
        return JSONResponse(obj, headers={"x-djinn-session-id": conv.id})

    @app.get("/v1/responses/{rid}")
    async def get(rid: str, request: Request):
        return lookup(auth(request), rid).obj

    @app.delete("/v1/responses/{rid}")
    async def delete(rid: str, request: Request):
        s = lookup(auth(request), rid)
        del store[rid]
        if journal is not None:
            await fe.call(journal.forget_response, rid)
        conv = fe.index.by_id.get(s.session_id)
        if conv is not None:
            conv.responses.discard(rid)
            if not conv.responses and not conv.lock.locked():
                await fe.close(conv)      # the last stored response on it: the session goes too
        return {"id": rid, "object": "response.deleted", "deleted": True}
