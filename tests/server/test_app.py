"""``serve()``'s edges that need no running server: refused configurations, and the hook
that starts the HTTP front end when this build has one."""

from __future__ import annotations

import asyncio
import sys
import threading
import types

import pytest

from djinn import cli
from djinn.config import Config, ServerConfig
from djinn.errors import InvalidRequest
from djinn.server import app


@pytest.mark.parametrize("argv,message", [
    (["--lease", "-1"], "--lease"),
    (["--max-message-size", "1KiB"], "at least 64KiB"),
    (["--token", ""], "token is empty"),
    (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without a token"),
])
def test_refused_configurations_say_why_before_loading_anything(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("djinn.engine.startup.build_engine",
                        lambda *a, **k: pytest.fail("models were loaded for a refused configuration"))
    assert cli.main(["serve", "--model", "tiny-llama", *argv]) == 2
    assert message in capsys.readouterr().err


def _config(http_port):
    return Config(models=["m"], server=ServerConfig(host="127.0.0.1", http_port=http_port))


def test_no_http_port_no_http_front_end():
    assert app._start_http(object(), _config(None), None) is None


def test_http_front_end_missing_from_the_build_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "djinn.server.http", None)   # import fails
    assert "not available in this build" in app._start_http(object(), _config(8123), None)


def test_http_front_end_runs_in_a_thread_or_as_a_task(monkeypatch):
    engine, config = object(), _config(8123)
    called = threading.Event()
    seen: list = []

    def run_http(e, c, port, host):
        seen.append((e, c, port, host))
        called.set()

    monkeypatch.setitem(sys.modules, "djinn.server.http", types.SimpleNamespace(run_http=run_http))
    assert "http://127.0.0.1:8123/v1" in app._start_http(engine, config, None)
    assert called.wait(5) and seen == [(engine, config, 8123, "127.0.0.1")]

    async def arun_http(e, c, port, host):
        seen.append(("async", port))

    monkeypatch.setitem(sys.modules, "djinn.server.http", types.SimpleNamespace(run_http=arun_http))

    async def main():
        app._start_http(engine, config, asyncio.get_running_loop())
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert seen[-1] == ("async", 8123)


def test_serve_checks_before_it_loads():
    with pytest.raises(InvalidRequest, match="refusing"):
        app.serve(Config(models=["tiny-llama"], server=ServerConfig(host="0.0.0.0")))
