"""A short soak (djinn bench soak) as a slow test: the checks of the long one, except the
latency drift, which needs minutes to mean anything."""

from __future__ import annotations

import pytest

from djinn.bench.soak import run_soak


@pytest.mark.slow
def test_a_short_soak_has_no_wrong_outputs_and_gives_every_byte_back():
    res = run_soak(minutes=0.25, workers=3, http_workers=1, kv_blocks=24, seed=5, check_every=2, max_drift=1e9)
    print(f"\nsoak: {res['native_turns']} native + {res['http_turns']} HTTP turns, swaps {res['swaps']}")
    checks = res["checks"]
    assert checks["wrong_outputs_zero"], res["wrong_samples"]
    assert checks["no_errors"], res["error_samples"]
    assert checks["memory_back_to_start"], (res["held_start"], res["held_end"])
    assert checks["outputs_checked"] and res["checked"]["http_conversations"] > 0
    assert res["swaps"]["out"] > 0                       # the budget forced parking
