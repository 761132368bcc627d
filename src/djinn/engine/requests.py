"""Typed requests and results that cross from a client (embedded or remote) into the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from djinn.engine.sampling import SamplingParams


@dataclass
class GenerateRequest:
    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    chat: bool | None = None          # None: chat-templated when the model is a chat model and prompt is text


@dataclass
class GenerateResult:
    token_ids: list[int]
    text: str
    finish_reason: str                # "stop" (eos / stop string / stop id) or "length"
    prompt_tokens: int                # tokens this turn added to the session before generating
    cached_tokens: int                # session tokens whose KV was reused (not recomputed)
    computed_tokens: int              # tokens that went through the model in this turn
    timings: dict[str, float] = field(default_factory=dict)   # queue_ms, restore_ms, prefill_ms, decode_ms, compute_ms, total_ms
    session_id: str = ""
