"""The agent workload of ``djinn bench agents``: who arrives when, what each turn sends, how
long each tool call takes.

Owns only the plan (pure data, no client, no clock). Invariants:

- the same ``seed`` gives the same plan for every policy, so policies are compared on the same
  arrivals, prompts and tool times; agent ``i``'s prompts and tool times do not depend on N;
- every prompt is random token ids drawn away from the special ids, fresh per agent and per
  turn, so no prefix cache can help by accident (nothing is shared between agents or turns),
  except ``shared_prefix_tokens``: a system prompt and tool list, the same random ids for every
  agent of one seed, put before each agent's first prompt (the ``shared-prefix`` preset);
- ``time_scale`` multiplies inter-arrival gaps and tool times alike (compute is never scaled),
  so a compressed run keeps its arrival pattern and its share of waiting; the JSON states it.

An agent runs ``turns`` generate calls; between consecutive ones it calls a tool (IO_WAIT for
its tool time, then ACTIVE) and the next turn appends the tool's output (``context_tokens``).
The first turn sends the system/context prompt (``prompt_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from djinn.errors import InvalidRequest

_DISTS = ("fixed", "uniform", "exp", "lognormal")


@dataclass(frozen=True)
class ToolTime:
    """A tool-time distribution in seconds, parsed from ``fixed:S``, ``uniform:A,B``, ``exp:MEAN``
    or ``lognormal:MEDIAN,SIGMA``."""

    kind: str
    args: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> "ToolTime":
        kind, _, rest = str(spec).partition(":")
        try:
            args = tuple(float(x) for x in rest.split(",")) if rest else ()
        except ValueError:
            args = ()
        want = {"fixed": 1, "uniform": 2, "exp": 1, "lognormal": 2}.get(kind)
        if want is None or len(args) != want or any(a < 0 for a in args) or (kind == "uniform" and args[0] > args[1]):
            raise InvalidRequest(f"bad tool time {spec!r}: use fixed:S, uniform:A,B (A<=B), exp:MEAN or "
                                 "lognormal:MEDIAN,SIGMA with non-negative seconds")
        return cls(kind, args)

    @property
    def spec(self) -> str:
        return f"{self.kind}:" + ",".join(f"{a:g}" for a in self.args)

    @property
    def mean(self) -> float:
        a = self.args
        if self.kind == "fixed":
            return a[0]
        if self.kind == "uniform":
            return (a[0] + a[1]) / 2
        if self.kind == "exp":
            return a[0]
        return a[0] * float(np.exp(a[1] ** 2 / 2))

    def draw(self, rng: np.random.Generator, n: int) -> list[float]:
        a = self.args
        if self.kind == "fixed":
            xs = np.full(n, a[0])
        elif self.kind == "uniform":
            xs = rng.uniform(a[0], a[1], n)
        elif self.kind == "exp":
            xs = rng.exponential(a[0], n)
        else:
            xs = rng.lognormal(np.log(max(a[0], 1e-9)), a[1], n)
        return [float(x) for x in xs]


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that decides the plan; ``n`` is the sweep variable."""

    n: int
    rate: float                  # Poisson arrivals per second; <= 0: everyone arrives at t=0
    turns: int                   # generate calls per agent (tool calls between them: turns - 1)
    prompt_tokens: int           # first turn: the system/context prompt
    context_tokens: int          # every later turn: the tool output appended
    new_tokens: int              # tokens generated per turn
    tool: ToolTime
    vocab_size: int
    seed: int = 0
    time_scale: float = 1.0
    low_token: int = 0           # token ids are drawn from [low_token, vocab_size) minus specials
    special_ids: tuple[int, ...] = ()
    shared_prefix_tokens: int = 0    # the same tokens for every agent, before its first prompt

    def validate(self, max_context: int | None = None) -> None:
        if self.n < 1 or self.turns < 1 or self.prompt_tokens < 1 or self.new_tokens < 1:
            raise InvalidRequest("agents, turns, prompt tokens and new tokens must all be >= 1")
        if self.turns > 1 and self.context_tokens < 1:
            raise InvalidRequest("each later turn must append at least one token (--context-tokens >= 1)")
        if self.time_scale <= 0:
            raise InvalidRequest("--time-scale must be > 0")
        if max_context is not None and self.final_tokens >= max_context:
            raise InvalidRequest(f"an agent would reach {self.final_tokens} tokens, over the model's context of "
                                 f"{max_context}: fewer turns or smaller prompts")

    @property
    def final_tokens(self) -> int:
        """Tokens one agent's session holds after its last turn."""
        return (self.shared_prefix_tokens + self.prompt_tokens + (self.turns - 1) * self.context_tokens
                + self.turns * self.new_tokens)


@dataclass
class AgentPlan:
    index: int
    arrival_s: float                          # seconds after the run starts (scaled)
    prompts: list[list[int]]                  # one per turn
    tool_s: list[float] = field(default_factory=list)   # one per tool call (scaled), len = turns - 1


def allowed_ids(spec: WorkloadSpec) -> np.ndarray:
    """Token ids a prompt may contain: [low_token, vocab_size) without the special ids."""
    return np.setdiff1d(np.arange(spec.low_token, spec.vocab_size), np.asarray(spec.special_ids, dtype=np.int64))


def build(spec: WorkloadSpec) -> list[AgentPlan]:
    """The plan for ``spec.n`` agents, sorted by arrival."""
    arrivals = np.zeros(spec.n)
    if spec.rate > 0 and spec.n > 1:
        gaps = np.random.default_rng([spec.seed, 0]).exponential(1.0 / spec.rate, spec.n - 1)
        arrivals[1:] = np.cumsum(gaps) * spec.time_scale
    allowed = allowed_ids(spec)

    def tokens(rng: np.random.Generator, k: int) -> list[int]:
        return [int(x) for x in allowed[rng.integers(0, len(allowed), k)]]

    shared = tokens(np.random.default_rng([spec.seed, 2]), spec.shared_prefix_tokens)
    plans = []
    for i in range(spec.n):
        rng = np.random.default_rng([spec.seed, 1, i])   # per agent: independent of n
        prompts = [shared + tokens(rng, spec.prompt_tokens)]
        prompts += [tokens(rng, spec.context_tokens) for _ in range(spec.turns - 1)]
        tools = [t * spec.time_scale for t in spec.tool.draw(rng, spec.turns - 1)]
        plans.append(AgentPlan(index=i, arrival_s=float(arrivals[i]), prompts=prompts, tool_s=tools))
    return plans
