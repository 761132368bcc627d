"""Request bodies in, typed requests out: the OpenAI chat shape, checked field by field.

Owns the rule that no field is accepted and then silently ignored: every body field is either
understood, accepted only at a value that means "off" (``n: 1``, ``logprobs: false`` ...), or
rejected with a 400 that names it. Messages come out normalised (text content, tool calls with
string arguments) so rendering and matching never see the many shapes clients send.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from djinn.server.http.errors import bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")
# a seed seeds torch's generator, which takes a signed or an unsigned 64-bit integer
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1
MAX_DEPTH = 64            # arrays and objects within each other in a body (a tool's schema is the deepest)
_SURROGATE = re.compile("[\ud800-\udfff]")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class Sampling:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class ChatRequest:
    """A chat turn as Djinn understands it, whichever endpoint it came through."""

    model: str
    messages: list[dict]                  # normalised: role, content (str), tool_calls, tool_call_id
    tools: list[dict] = field(default_factory=list)   # [{"name", "description", "parameters"}]
    tool_choice: str | dict = "none"      # "none" | "auto" | "required" | {"name": NAME}
    parallel_tool_calls: bool = True
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    include_usage: bool = False
    session: str | None = None            # X-Djinn-Session header or djinn_session body field
    namespace: str | None = None          # prompt_cache_key / user: sessions only match within one


def check_body(body: Any) -> None:
    """400 for a JSON body no field check should have to meet: nested deeper than ``MAX_DEPTH``
    (prompt rendering, the grammar compiler and ``json`` itself recurse), or a string or key
    holding an unpaired surrogate (``"\\ud800"`` is valid JSON, but not text: no tokenizer
    or UTF-8 encoder takes it)."""
    stack = [(body, 0, "body")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise bad_request(f"{where} holds an unpaired UTF-16 surrogate, which is not text; send valid "
                                  "Unicode (a \\ud83d\\ude00 pair is fine)", param=None if where == "body" else where,
                                  code="invalid_unicode")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise bad_request(f"the body nests arrays and objects more than {MAX_DEPTH} deep", code="too_deep")
        if isinstance(value, dict):
            for k, v in value.items():
                key = f"{where}.{k}" if where != "body" else k
                if _SURROGATE.search(k):
                    raise bad_request(f"a field name in {where} holds an unpaired UTF-16 surrogate, which is not text",
                                      code="invalid_unicode")
                stack.append((v, depth + 1, key))
        else:
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))


def reject_unknown(body: dict, allowed: set[str], off_values: dict[str, tuple]) -> None:
    """400 naming every field that is neither understood nor at a value meaning "off"."""
    unknown = sorted(k for k in body if k not in allowed and k not in off_values)
    unsupported = sorted(k for k, ok in off_values.items() if k in body and body[k] not in ok)
    if unknown or unsupported:
        parts = []
        if unknown:
            parts.append(f"unknown or unsupported field(s): {', '.join(unknown)}")
        if unsupported:
            parts.append("field(s) set to a value Djinn does not support: "
                         + ", ".join(f"{k}={body[k]!r}" for k in unsupported))
        raise bad_request("; ".join(parts) + ". Remove them; Djinn never accepts a field it would ignore.",
                          param=(unknown or unsupported)[0], code="unsupported_parameter")


def text_of(content: Any, where: str, allow_none: bool = False) -> str | None:
    """Text content: a string, or a list of text parts (``text`` / ``input_text`` / ``output_text``)."""
    if content is None and allow_none:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text") \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{where}: only text content parts are supported, got {kind!r}", param=where)
            out.append(part["text"])
        return "".join(out)
    raise bad_request(f"{where}: content must be a string or a list of text parts", param=where)


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise bad_request(f"{where}.tool_calls must be a non-empty list", param=f"{where}.tool_calls")
    out = []
    for j, c in enumerate(calls):
        w = f"{where}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(c, dict) or not isinstance(c.get("id"), str) or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad_request(f"{w} must be {{id, type: 'function', function: {{name, arguments (a JSON string)}}}}",
                              param=w)
        if c.get("type", "function") != "function":
            raise bad_request(f"{w}.type must be 'function'", param=w)
        out.append({"id": c["id"], "name": fn["name"], "arguments": fn["arguments"]})
    return out


def messages(raw: Any) -> list[dict]:
    """Normalise and check chat messages; a tool result must answer a call made earlier in them."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list", param="messages")
    out: list[dict] = []
    open_ids: set[str] = set()
    for i, m in enumerate(raw):
        w = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad_request(f"{w}.role must be one of {', '.join(ROLES)}", param=f"{w}.role")
        extra = sorted(k for k, v in m.items()
                       if k not in ("role", "content", "name", "tool_calls", "tool_call_id") and v is not None)
        if extra:
            raise bad_request(f"{w}: unsupported field(s) {', '.join(extra)}", param=f"{w}.{extra[0]}")
        role = m["role"]
        msg: dict = {"role": "system" if role == "developer" else role}
        if role == "assistant":
            msg["content"] = text_of(m.get("content"), f"{w}.content", allow_none=True) or ""
            if m.get("tool_calls") is not None:
                msg["tool_calls"] = _tool_calls(m["tool_calls"], w)
                open_ids.update(c["id"] for c in msg["tool_calls"])
            elif not msg["content"] and "content" not in m:
                raise bad_request(f"{w}: an assistant message needs content or tool_calls", param=f"{w}.content")
        elif role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str):
                raise bad_request(f"{w}.tool_call_id must be a string", param=f"{w}.tool_call_id")
            if tid not in open_ids:
                raise bad_request(f"{w} is a tool result for {tid!r}, which no earlier assistant message called",
                                  param=f"{w}.tool_call_id", code="unknown_tool_call_id")
            msg["tool_call_id"] = tid
            msg["content"] = text_of(m.get("content"), f"{w}.content")
        else:
            if "content" not in m:
                raise bad_request(f"{w}.content is required", param=f"{w}.content")
            msg["content"] = text_of(m["content"], f"{w}.content")
        out.append(msg)
    return out


def tools(raw: Any, flat: bool = False) -> list[dict]:
    """Function tools, chat shape ``{type, function: {...}}`` or (``flat``, Responses) ``{type, name, ...}``."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request("tools must be a list", param="tools")
    out, names = [], set()
    for i, t in enumerate(raw):
        w = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise bad_request(f"{w}: only tools of type 'function' are supported", param=w)
        fn = t if flat else t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise bad_request(f"{w}: a function tool needs a name of letters, digits, _ . - (at most 64)", param=w)
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_request(f"{w}: parameters must be a JSON schema object", param=w)
        if fn["name"] in names:
            raise bad_request(f"{w}: duplicate tool name {fn['name']!r}", param=w)
        names.add(fn["name"])
        out.append({"name": fn["name"], "description": fn.get("description") or "", "parameters": params})
    return out


def tool_choice(raw: Any, tool_list: list[dict], flat: bool = False) -> str | dict:
    if raw is None:
        return "auto" if tool_list else "none"
    if raw in ("none", "auto", "required"):
        if raw == "required" and not tool_list:
            raise bad_request("tool_choice 'required' needs tools", param="tool_choice")
        return raw
    name = None
    if isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("name") if flat else (raw.get("function") or {}).get("name")
    if not isinstance(name, str):
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or a named function", param="tool_choice")
    if name not in {t["name"] for t in tool_list}:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return {"name": name}


def sampling(body: dict, max_key: str | tuple = "max_tokens") -> Sampling:
    keys = (max_key,) if isinstance(max_key, str) else max_key
    given = [body[k] for k in keys if body.get(k) is not None]
    if len(set(map(repr, given))) > 1:
        raise bad_request(f"{' and '.join(keys)} disagree; give one", param=keys[0])
    mt = given[0] if given else None
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        raise bad_request(f"{keys[0]} must be a positive integer", param=keys[0])
    temp = body.get("temperature", 1.0)
    temp = 1.0 if temp is None else temp
    if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not 0 <= temp <= 2:
        raise bad_request("temperature must be a number in [0, 2]", param="temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise bad_request("top_p must be a number in (0, 1]", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX):
        raise bad_request(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}]", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of at most 4 of them", param="stop")
    return Sampling(max_tokens=mt, temperature=float(temp), top_p=float(top_p), seed=seed, stop=stop)


def namespace(body: dict) -> str | None:
    for key in ("prompt_cache_key", "user"):
        v = body.get(key)
        if v is not None and not isinstance(v, str):
            raise bad_request(f"{key} must be a string", param=key)
    return body.get("prompt_cache_key") or body.get("user")


def session_field(body: dict, header: str | None) -> str | None:
    v = body.get("djinn_session")
    if v is not None and not isinstance(v, str):
        raise bad_request("djinn_session must be a string (a session id)", param="djinn_session")
    if v and header and v != header:
        raise bad_request("the X-Djinn-Session header and the djinn_session field name different sessions",
                          param="djinn_session")
    return header or v


CHAT_FIELDS = {"model", "messages", "tools", "tool_choice", "parallel_tool_calls", "stream", "stream_options", "stop",
               "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "user", "prompt_cache_key",
               "djinn_session"}
CHAT_OFF = {"n": (1, None), "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
            "logprobs": (False, None), "top_logprobs": (None, 0), "store": (False, None), "logit_bias": (None, {}),
            "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"),
            "metadata": (None,), "modalities": (None, ["text"]), "reasoning_effort": (None,),
            "function_call": (None,), "functions": (None,), "audio": (None,), "prediction": (None,),
            "web_search_options": (None,), "verbosity": (None,), "safety_identifier": (None,)}


def chat_request(body: Any, header_session: str | None) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    reject_unknown(body, CHAT_FIELDS, CHAT_OFF)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("model is required", param="model")
    tl = tools(body.get("tools"))
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", param="stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise bad_request("stream_options supports only include_usage", param="stream_options")
    ptc = body.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        raise bad_request("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    return ChatRequest(
        model=body["model"], messages=messages(body.get("messages")), tools=tl,
        tool_choice=tool_choice(body.get("tool_choice"), tl), parallel_tool_calls=ptc is not False,
        sampling=sampling(body, ("max_completion_tokens", "max_tokens")), stream=stream,
        include_usage=bool((opts or {}).get("include_usage")), session=session_field(body, header_session),
        namespace=namespace(body))


def arguments_ok(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False
