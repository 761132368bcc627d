"""Typed requests and results that cross from a client (embedded or remote) into the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from djinn.engine.sampling import SamplingParams


@dataclass
class GenerateRequest:
    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    chat: bool | None = None          # None: chat-templated when the model is a chat model and prompt is text
    # Hooks for front ends (the HTTP API's streaming and grammar-constrained tool calls). Both run on
    # the engine loop thread, so they must be quick and must not call back into the engine.
    # logits_processor(out, logits): ``out`` = tokens generated so far this turn, ``logits`` = [1, vocab]
    # float logits of the next token; returns the logits to sample from (e.g. masked by a grammar).
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    # on_token(token_id): called after each generated token joins the session. Raising from it (e.g.
    # djinn.errors.Cancelled when the client went away) aborts the turn and rolls the session back.
    on_token: Callable[[int], None] | None = None


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
