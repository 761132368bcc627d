"""Typed requests and results that cross from a client (embedded or remote) into the engine.

Everything here is plain data (tensors at most), so a remote backend can put it on the wire
as the protocol's ``generate`` message and reply.
"""

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
    # white-box (engine/whitebox.py, docs/whitebox.md):
    interventions: list[dict] = field(default_factory=list)   # {"kind": "scale"|"add", "layer", "factor"|"vector", "positions"}
    capture: list[int] = field(default_factory=list)          # layers whose hidden states the result hands back
    breakpoint: tuple[int, int] | None = None                 # (layer, step): pause there; step 0 = the prefill

    @property
    def whitebox(self) -> bool:
        return bool(self.interventions or self.capture or self.breakpoint is not None)
    # In-process hooks for front ends (the HTTP API's streaming and grammar-constrained tool calls); never
    # on the wire (a remote client cannot send code). Both run on
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
    finish_reason: str                # "stop" (eos / stop string / stop id), "length", or "breakpoint" (paused)
    prompt_tokens: int                # tokens this turn added to the session before generating
    cached_tokens: int                # session tokens whose KV was reused (not recomputed)
    computed_tokens: int              # tokens that went through the model in this turn
    timings: dict[str, float] = field(default_factory=dict)   # queue_ms, restore_ms, prefill_ms, decode_ms, compute_ms, total_ms
    session_id: str = ""
    captured: dict = field(default_factory=dict)   # layer -> tensor handle ({"id", "shape", "dtype", "session_id"})
    paused: dict | None = None        # finish_reason "breakpoint": {"paused_id", "layer", "step", "activation"}
