"""Real ``python -m djinn.server.http`` processes for the HTTP tests, on free loopback ports."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from djinn.bench.agent_api import HttpServer

SRC = str(Path(__file__).resolve().parents[2] / "src")
KEY, OTHER_KEY = "test-key-one", "test-key-two"


class ServerProcess(HttpServer):
    """``bench/agent_api.HttpServer`` with this checkout's src on the child's path and the
    tokens given in ``args``, plus the helpers the tests use."""

    def __init__(self, *args: str, timeout: float = 240.0):
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        super().__init__(list(args), timeout_s=timeout, token=None, env=env)

    def client(self, key: str = KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=600)

    def get(self, path: str, key: str = KEY) -> httpx.Response:
        return httpx.get(self.root + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def session(self, sid: str, key: str = KEY) -> dict:
        r = self.get(f"/v1/sessions/{sid}", key)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, sid: str, key: str = KEY, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.session(sid, key)
            if not info["busy"] or time.monotonic() > deadline:
                return info
            time.sleep(0.2)


def smollm2_server(*extra: str) -> ServerProcess:
    return ServerProcess("--model", "smollm2-135m", "--token", KEY, "--token", OTHER_KEY, "--kv-blocks", "512",
                         "--policy", "semantic", "--device", "cpu", *extra)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Use tools when they help."}


def assistant_message(msg) -> dict:
    """An assistant reply as a client sends it back (the openai object to a plain dict)."""
    out = {"role": "assistant", "content": msg.content}
    if msg.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in msg.tool_calls]
    return out
