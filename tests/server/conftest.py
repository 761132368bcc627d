"""One SmolLM2 HTTP server process for the HTTP tests (loading the model is the slow part)."""

from __future__ import annotations

import pytest

from tests.conftest import HTTP_DEPS, require, smollm2_available
from tests.server.http_helpers import smollm2_server


@pytest.fixture(scope="session")
def server():
    if not smollm2_available():
        pytest.skip("smollm2-135m not in the model cache: run `djinn models pull smollm2-135m`")
    require(*HTTP_DEPS, "openai")
    s = smollm2_server()
    yield s
    s.stop()
