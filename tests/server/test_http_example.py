"""examples/openai_agent_loop.py runs against a real server and reuses its KV across the tool call."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import HTTP_DEPS, require

require(*HTTP_DEPS, "openai")  # the example's client, and the server it talks to

from tests.server.http_helpers import KEY  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "openai_agent_loop.py"


def test_openai_agent_loop_example(server):
    out = subprocess.run([sys.executable, str(EXAMPLE), "--base-url", server.url, "--api-key", KEY,
                          "--max-turns", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    turns = re.findall(r"turn (\d): finish=(\w+) prompt=(\d+) cached=(\d+) session=(\w+) matched_by=(\w+)", out.stdout)
    assert len(turns) == 2, out.stdout
    (_, f1, p1, c1, s1, _), (_, _, p2, c2, s2, how2) = turns
    # a first turn computes everything but whole blocks another conversation of this key already
    # holds (the tests share one server, and the example's system prompt and tools may match)
    assert f1 == "tool_calls" and int(c1) % 16 == 0 and int(c1) < int(p1)
    assert "tool get_weather(" in out.stdout
    assert s2 == s1 and how2 == "tool_call_ids" and int(c2) > int(p1)
