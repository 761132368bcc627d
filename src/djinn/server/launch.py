"""``djinn serve`` as a child process, for tests and benchmarks: on a port the system picks.

The port is never hard-coded: the server binds port 0 and the parent reads the address from
its "listening on" line. Output is collected by a thread (the pipe never fills) and kept
for assertions and failure messages. The child runs the same djinn as the parent (its
``src`` first on PYTHONPATH).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import djinn

SRC = str(Path(djinn.__file__).resolve().parents[1])   # the djinn under test, for the subprocess
_LISTENING = re.compile(r"listening on (\S+)")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("DJINN_TOKEN", None)
    env.update(extra)
    return env


class ServerProcess:
    def __init__(self, *args: str, model: str = "tiny-llama", token: str | None = None, device: str = "cpu",
                 env: dict[str, str] | None = None):
        """``args``: more ``djinn serve`` options (e.g. ``--kv-blocks 64``, ``--lease 1``);
        ``env``: extra environment variables of the child."""
        self.env = dict(env or {})
        self.args = ["serve", "--model", model, "--device", device, "--port", "0", *args]
        if token is not None:
            self.args += ["--token", token]
        self.token = token
        self.lines: list[str] = []
        self.address: str | None = None
        self.proc: subprocess.Popen | None = None
        self._listening = threading.Event()

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "djinn.cli", *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=subprocess_env(**self.env), bufsize=1)
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        if not self._listening.wait(timeout) or self.address is None:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"djinn serve did not start within {timeout} s:\n{self.output}")
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and self.address is None:
                self.address = m.group(1)
                self._listening.set()
        self._listening.set()   # exited: wake start() up

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait for it; returns its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._pump_thread.join(10)   # all output read
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
