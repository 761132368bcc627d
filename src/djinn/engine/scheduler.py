"""The step scheduler: which turns run in the next batch step, and how much of each.

It only decides; the batcher builds the step from the decision (reserving the turns' blocks),
the model runner executes it (``engine/runner.py``), and the residency moves KV. A decision
is data: a list of ``(turn, chunk)`` pairs in step order, so it is tested with fake turns and
no model (tests/engine/test_scheduler.py).

Rules, per model:
- turns are served oldest session first, so a session that comes back from a tool call keeps
  its place ahead of sessions that arrived after it;
- every generating turn (one pending token) adds its decode token, up to ``max_batch`` turns;
- then turns with a prompt still to compute add chunks of it under ``prefill_tokens`` for the
  whole step, so a long prompt never stalls the others' decodes (chunked prefill), while
  ``max_batch`` allows.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class SchedulableTurn(Protocol):
    """What the scheduler reads of a running turn."""

    @property
    def session(self): ...          # .created_at (order), .tokens, .num_cached

    @property
    def pending(self) -> int: ...   # tokens of the session not yet in its KV


def plan_step(turns: Sequence[SchedulableTurn], max_batch: int, prefill_tokens: int) -> list[tuple[object, list[int]]]:
    """The next step of ``turns`` (all of one model): ``[(turn, tokens to compute)]``."""
    turns = sorted(turns, key=lambda r: r.session.created_at)
    plan = [(r, r.session.tokens[-1:]) for r in turns if r.pending == 1][:max_batch]
    budget = prefill_tokens
    for r in turns:
        if r.pending > 1 and budget > 0 and len(plan) < max_batch:
            s = r.session
            chunk = s.tokens[s.num_cached: s.num_cached + min(r.pending, budget)]
            plan.append((r, chunk))
            budget -= len(chunk)
    return plan
