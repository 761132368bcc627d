"""``djinn demo``: the embedded default, server and client in one process.

Shows a chat answer, a second turn that continues the same server-resident session (only the
new tokens are computed), a second session sharing the same weights, a tool call during which
the first session's KV is parked in host memory (``IO_WAIT``) and brought back (``ACTIVE``) before
it continues, and for every step where each session's state lives and how long the step took.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table

from djinn.client import Client
from djinn.client.embedded import EmbeddedBackend
from djinn.config import Config

REAL_MODEL = "smollm2-135m"
FALLBACK = "tiny-llama"


def _pick_model(config: Config, asked: str | None) -> tuple[str, bool]:
    if asked:
        return asked, True
    return (REAL_MODEL, True) if (config.home / "models" / REAL_MODEL / "config.json").exists() else (FALLBACK, False)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _settled(sess, timeout: float = 10.0) -> dict:
    """The session's info once its KV stopped moving (a park takes a moment)."""
    deadline = time.monotonic() + timeout
    info = sess.info()
    while info["kv_location"] == "moving" and time.monotonic() < deadline:
        time.sleep(0.005)
        info = sess.info()
    return info


def run_demo(config: Config, model: str | None = None) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=140)   # logs and CI: no 80-column wrap
    name, real = _pick_model(config, model)
    if not real:
        console.print(f"[yellow]{REAL_MODEL} is not in the model cache ({config.home / 'models'}); running on the "
                      f"random-weight preset {FALLBACK}, whose text is gibberish.[/]\n"
                      f"Get the real model once with: [bold]djinn models pull {REAL_MODEL}[/]\n")
    t0 = time.perf_counter()
    config.models = [name]
    client = Client(EmbeddedBackend(config))
    m = client.model(name)
    stats = client.stats()
    console.print(f"Loaded [bold]{name}[/] ({m.num_layers} layers) on {stats['device']} in "
                  f"{time.perf_counter() - t0:.1f} s: weights {_mib(stats['memory']['weights'])}, "
                  f"KV pool {_mib(stats['memory']['kv_device_capacity'])}")

    table = Table(title="Each step: where the session's state lives and what it cost")
    for col in ("step", "session", "prompt tok", "cached", "computed", "KV where, size", "restore", "time"):
        table.add_column(col)

    def show(step: str, sess, out, prompt_text: str) -> None:
        info = sess.info()
        console.print(f"\n[bold cyan]{step}[/] [dim](session {sess.id[:8]})[/]\n[green]user:[/] {prompt_text}\n"
                      f"[magenta]assistant:[/] {out.text.strip()}")
        table.add_row(step, sess.id[:8], str(out.prompt_tokens), str(out.cached_tokens), str(out.computed_tokens),
                      f"{info['kv_location']}: {info['kv_tokens']} tok, {_mib(info['kv_bytes'])}",
                      f"{out.timings['restore_ms']:.1f} ms", f"{out.timings['total_ms']:.0f} ms")

    a = m.session()
    q1 = "What is the capital of France? Answer in one sentence."
    show("1. first turn", a, a.generate(q1, max_new_tokens=40), q1)
    q2 = "And what is the capital of Italy?"
    show("2. same session, next turn", a, a.generate(q2, max_new_tokens=40), q2)
    b = m.session()
    q3 = "Name three colours of the rainbow."
    show("3. second session, same weights", b, b.generate(q3, max_new_tokens=40), q3)

    # 4-5. session A calls a tool: its KV goes to host memory while B keeps computing
    a.signal_phase("IO_WAIT")
    policy = client.stats()["policy"]
    why = {"semantic-park": "every IO_WAIT parks (the default, semantic, parks only when the memory is needed)",
           "semantic": "it parks a long wait only when the memory is needed"}.get(policy, "")
    console.print(f"\n[bold cyan]Session {a.id[:8]} calls a tool[/] and signals IO_WAIT; policy {policy}"
                  + (f": {why}" if why else "") + f" (right after the signal its KV is: [bold]{a.info()['kv_location']}[/])")
    q4 = "Name a fruit that is yellow."
    show("4. B works while A's tool runs", b, b.generate(q4, max_new_tokens=24), q4)
    info = _settled(a)
    console.print(f"   A's KV: [bold]{info['kv_location']}[/] ({_mib(info['kv_bytes'])}); "
                  f"{_mib(client.stats()['memory']['kv_parked'])} of KV parked in host memory")
    a.signal_phase("ACTIVE")    # the tool returned: bring the KV back ahead of the next request
    q5 = "The tool says: Rome has 2.8 million people. Summarise that in one sentence."
    show("5. A continues after its tool (ACTIVE)", a, a.generate(q5, max_new_tokens=40), q5)

    console.print()
    console.print(table)
    stats = client.stats()
    mem = stats["memory"]
    console.print(f"Weights loaded once for {stats['sessions']} sessions: {_mib(mem['weights'])}; "
                  f"KV on device {_mib(mem['kv_device'])}, KV parked in host memory {_mib(mem['kv_parked'])}; "
                  f"sessions by phase {stats['sessions_by_phase']}")
    moved = stats["bytes_moved"]
    console.print(f"Memory policy '{stats['policy']}': swaps {stats['swaps']['out']} out / {stats['swaps']['in']} in, "
                  f"{_mib(moved['out'])} parked and {_mib(moved['in'])} restored in all")
    a.close()
    b.close()
    client.close()
    console.print(f"Done in {time.perf_counter() - t0:.1f} s.")
    return 0
