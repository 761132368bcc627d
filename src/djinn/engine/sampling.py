"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from djinn.errors import InvalidRequest


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(1 << 63) <= self.seed < (1 << 64)):
            # checked here, before a turn begins: torch.Generator.manual_seed refuses the rest, and
            # a Sampler that failed to build once left the session marked busy
            raise InvalidRequest(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop must be a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


MIN_TEMPERATURE = 1e-4   # below this, sampling is argmax in float32 anyway


class Sampler:
    """Per-request sampler; holds the request's own random generator so runs repeat by seed."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits``: [B, vocab] (float). Returns [B] token ids."""
        p = self.params
        if p.greedy or p.temperature < MIN_TEMPERATURE:   # dividing by it would overflow to inf (NaN probs)
            return logits.argmax(dim=-1)
        logits = logits.float() / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            drop = probs.cumsum(dim=-1) - probs >= p.top_p
            # ... also when top_p is below float32's smallest value (it compares as 0): found by fuzzing
            drop[..., 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def stop_check(out: list[int], stop_ids: set[int], params: SamplingParams, tokenizer, session_tokens: int,
               max_context: int) -> tuple[str | None, str | None]:
    """The one stop rule of every generation path, after ``out[-1]`` was appended:
    ``("stop" | "length" | None, the text cut before a stop string, or None)``."""
    if out[-1] in stop_ids:
        return "stop", None
    if params.stop:
        text = tokenizer.decode(out, skip_special_tokens=True)
        hit = min((text.find(x) for x in params.stop if x in text), default=-1)
        if hit >= 0:
            return "stop", text[:hit]
    if len(out) >= params.max_new_tokens or session_tokens >= max_context:
        return "length", None
    return None, None
