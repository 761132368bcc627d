"""The suite collects, and skips what cannot run, on a machine that lacks a package of the HTTP
front end or of its tests (the GPU machine had no ``openai``: collecting tests/server failed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs pytest --collect-only in a child whose imports of the named packages fail as if they were
# not installed; the pytest plugins those packages register are left out too, as they would be.
COLLECT_WITHOUT = """
import sys
from importlib.metadata import entry_points
import pytest

missing = set(sys.argv[1].split(","))

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
plugins = [arg for ep in entry_points(group="pytest11") if ep.dist.name in missing for arg in ("-p", "no:" + ep.name)]
sys.exit(pytest.main(["--collect-only", "-q", "-rs", "-p", "no:cacheprovider", *plugins, "tests"]))
"""


@pytest.mark.parametrize("missing", ["openai", "openai,fastapi,uvicorn,prometheus_client,schemathesis"])
def test_the_suite_collects_without_optional_packages(missing):
    out = subprocess.run([sys.executable, "-c", COLLECT_WITHOUT, missing], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "error" not in out.stdout.splitlines()[-1]
    assert re.search(r"SKIPPED \[1\] tests/server/test_http_api\.py:\d+: needs (openai|fastapi)", out.stdout)
