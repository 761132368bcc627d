"""Shared fixtures: tiny models loaded once per test session, SmolLM2 if it was pulled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from djinn.config import default_home
from djinn.models import load_model

SMOLLM2 = "smollm2-135m"


def smollm2_available() -> bool:
    return (default_home() / "models" / SMOLLM2 / "config.json").exists()


requires_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                      reason=f"{SMOLLM2} not in the model cache: run `djinn models pull {SMOLLM2}`")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

_CACHE: dict = {}

# Packages of the OpenAI-compatible front end (src/djinn/server/http). The project depends on
# them, but a machine set up by hand may lack one (the GPU machine had no openai): a test module
# that needs them calls ``require`` before importing them, so the suite still collects there and
# skips what cannot run.
HTTP_DEPS = ("fastapi", "uvicorn", "prometheus_client")


def require(*modules: str) -> None:
    """Skip the calling test module (called at module level) or test unless each of ``modules``
    can be imported."""
    __tracebackhide__ = True  # the skip is reported at the caller's line
    for name in modules:
        pytest.importorskip(name, reason=f"needs {name}, which is not installed (pip install -e '.[test]')")


# Environment of the servers and clients tests start as processes: one intra-op thread. The
# test models are tiny, and on a shared 2-core machine torch's OpenMP threads of a server,
# its clients and pytest only wait on each other (measured: a tiny-llama decode step takes
# 2.7 ms with one thread, 40-75 ms with two on a loaded machine).
TEST_CHILD_ENV = {"OMP_NUM_THREADS": "1"}


def loaded(name: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """A LoadedModel shared across tests (loading is the slow part)."""
    key = (name, device, dtype)
    if key not in _CACHE:
        _CACHE[key] = load_model(name, device=torch.device(device), dtype=dtype, home=default_home(), progress=False)
    return _CACHE[key]


@pytest.fixture(scope="session")
def tiny_llama():
    return loaded("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return loaded("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2():
    if not smollm2_available():
        pytest.skip(f"{SMOLLM2} not in the model cache: run `djinn models pull {SMOLLM2}`")
    return loaded(SMOLLM2)


@pytest.fixture(scope="session")
def djinn_server():
    """One real ``djinn serve`` (tiny-llama, a small KV pool, no token, loopback) shared by the
    test modules that run the public API remotely; stopped (SIGTERM) at the end."""
    from djinn.server.launch import ServerProcess

    server = ServerProcess("--kv-blocks", "256", env=TEST_CHILD_ENV).start()
    yield server
    code = server.stop()
    assert code == 0, f"djinn serve exited with {code}:\n{server.output}"


def pytest_sessionfinish(session, exitstatus):
    """Stop engines some test left running: their daemon threads must not be inside torch when
    the interpreter exits (that aborts the process after every test has passed)."""
    from djinn.engine.engine import shutdown_all

    shutdown_all()



def run_interpreted(target: str, timeout: float = 240) -> None:
    """Run ``target`` ("tests.module:function") in a fresh process with ``TRITON_INTERPRET=1``
    (Triton reads it at import time), so the GPU kernels run on CPU tensors; fail with its
    output if it fails. Skips where Triton is not installed."""
    pytest.importorskip("triton")
    module, func = target.split(":")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")]))
    code = f"from {module} import {func}; {func}()"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
