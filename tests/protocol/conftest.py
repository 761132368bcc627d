"""Protocol test setup: a hypothesis profile, and the number of cases hypothesis ran,
printed at the end of the run so CI logs show how much fuzzing actually happened."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from tests.protocol.helpers import CASES, FUZZ_SCALE

# Derandomized by default so a red CI run reproduces; DJINN_FUZZ=N runs N times the cases
# with fresh randomness, to look for new ones.
settings.register_profile("djinn-protocol", deadline=None, derandomize=FUZZ_SCALE == 1,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.load_profile("djinn-protocol")


def pytest_terminal_summary(terminalreporter):
    if CASES:
        terminalreporter.write_sep("-", f"hypothesis: {sum(CASES.values())} protocol cases run")
        for name, n in sorted(CASES.items()):
            terminalreporter.write_line(f"  {n:6d}  {name}")
