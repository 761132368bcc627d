"""The free set of pools and arenas: a run of consecutive ids when one is long enough, else the
lowest ids; ids are never handed out twice nor freed twice."""

from __future__ import annotations

import random

import pytest

from djinn.memory.freelist import FreeBlocks


def test_first_run_long_enough_else_lowest_ids():
    f = FreeBlocks(20)
    f.add_range(1, 19)
    a, b, c = f.take(4), f.take(4), f.take(4)
    assert (a, b, c) == ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12])
    for x in (2, 4, 6, 10):            # scattered singles, and a run 13..19 of 7
        f.add(x)
    assert f.take(5) == [13, 14, 15, 16, 17]        # skips the scattered ones for the run
    assert f.take(4) == [2, 4, 6, 10]               # no run of 4: the lowest ids
    assert len(f) == 2 and f.take(2) == [18, 19]


def test_double_free_is_refused():
    f = FreeBlocks(4)
    f.add_range(0, 2)
    with pytest.raises(RuntimeError):
        f.add(1)
    with pytest.raises(RuntimeError):
        f.add_range(1, 2)


def test_churn_never_hands_out_an_id_twice():
    rng = random.Random(0)
    f = FreeBlocks(300)
    f.add_range(1, 299)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and (rng.random() < 0.5 or len(f) < 40):
            for b in held.pop(rng.randrange(len(held))):
                f.add(b)
        else:
            held.append(f.take(rng.randint(1, 40)))
        flat = [b for h in held for b in h]
        assert len(flat) == len(set(flat)) and 0 not in flat
        assert len(f) + len(flat) == 299
