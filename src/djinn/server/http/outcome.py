"""A finished turn, and its two faces: the chat completion object and the SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from djinn.server.http.toolcalls import ToolCall


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}" if prefix == "chatcmpl" else f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass
class Outcome:
    model: str
    session_id: str
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str                # stop | length | tool_calls
    prompt_tokens: int                # the whole prompt, as OpenAI counts it
    completion_tokens: int
    cached_tokens: int                # prompt tokens whose KV was reused, not computed
    djinn: dict
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": 0}}

    def calls_json(self) -> list[dict]:
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls]

    def completion(self) -> dict:
        message = {"role": "assistant", "content": self.content, "refusal": None}
        if self.tool_calls:
            message["tool_calls"] = self.calls_json()
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}],
                "usage": self.usage(), "djinn": self.djinn}


def chunk(o: Outcome | dict, delta: dict | None, finish: str | None = None, **extra) -> str:
    """One ``data:`` line of a chat.completion.chunk stream."""
    head = o if isinstance(o, dict) else {"id": o.id, "created": o.created, "model": o.model}
    body = {"id": head["id"], "object": "chat.completion.chunk", "created": head["created"], "model": head["model"],
            "system_fingerprint": None,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    body.update(extra)
    return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"


def tail_chunks(o: Outcome, include_usage: bool) -> list[str]:
    """Tool-call deltas (header, then arguments), the finish chunk, the usage chunk, [DONE]."""
    out = []
    for i, c in enumerate(o.tool_calls):
        out.append(chunk(o, {"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                             "function": {"name": c.name, "arguments": ""}}]}))
        out.append(chunk(o, {"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]}))
    out.append(chunk(o, {}, o.finish_reason, djinn=o.djinn))
    if include_usage:
        out.append(chunk(o, None, usage=o.usage()))
    out.append("data: [DONE]\n\n")
    return out


def replay_chunks(o: Outcome, include_usage: bool) -> list[str]:
    """A remembered outcome streamed again (a client retry)."""
    first = [chunk(o, {"role": "assistant", "content": ""})]
    if o.content:
        first.append(chunk(o, {"content": o.content}))
    return first + tail_chunks(o, include_usage)


def error_event(err: dict) -> str:
    return "data: " + json.dumps(err, ensure_ascii=False) + "\n\n"
