"""Typed requests and results that cross from a client (embedded or remote) into the engine.

Everything here is plain data (tensors at most), so a remote backend can put it on the wire
as the protocol's ``generate`` message and reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
