"""The step scheduler alone: fake turns, no model (engine/scheduler.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from djinn.engine.scheduler import plan_step


@dataclass
class FakeSession:
    created_at: float
    tokens: list[int]
    num_cached: int


@dataclass
class FakeTurn:
    session: FakeSession
    name: str = field(default="")

    @property
    def pending(self) -> int:
        return len(self.session.tokens) - self.session.num_cached


def turn(name: str, created: float, tokens: int, cached: int) -> FakeTurn:
    return FakeTurn(FakeSession(created, list(range(100, 100 + tokens)), cached), name)


def names(plan) -> list[tuple[str, int]]:
    return [(t.name, len(chunk)) for t, chunk in plan]


def test_decodes_first_then_chunks_oldest_first_under_the_budget():
    turns = [turn("new-prompt", 3.0, 300, 0), turn("dec-b", 2.0, 50, 49), turn("old-prompt", 0.5, 700, 100),
             turn("dec-a", 1.0, 20, 19)]
    plan = plan_step(turns, max_batch=8, prefill_tokens=512)
    assert names(plan) == [("dec-a", 1), ("dec-b", 1), ("old-prompt", 512)]
    # the chunk is the next uncomputed tokens of the oldest session's prompt
    assert plan[2][1] == list(range(200, 712))


def test_a_budget_shared_by_several_prompts_and_max_batch_held():
    turns = [turn(f"p{i}", float(i), 100, 40) for i in range(5)]
    assert names(plan_step(turns, max_batch=8, prefill_tokens=150)) == [("p0", 60), ("p1", 60), ("p2", 30)]
    assert names(plan_step(turns, max_batch=2, prefill_tokens=150)) == [("p0", 60), ("p1", 60)]
    decodes = [turn(f"d{i}", float(i), 10, 9) for i in range(6)]
    assert names(plan_step(decodes + turns, max_batch=4, prefill_tokens=150)) == [(f"d{i}", 1) for i in range(4)]


def test_nothing_to_run_is_an_empty_plan():
    assert plan_step([turn("done", 0.0, 10, 10)], max_batch=4, prefill_tokens=64) == []
