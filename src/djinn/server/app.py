"""``djinn serve``: load the models once, listen, serve until SIGINT/SIGTERM, shut down cleanly.

Order of events: check the bind address against the token policy (before anything slow,
so a refused start costs nothing); load every model onto the device; start the native
server (and the OpenAI-compatible HTTP front end when ``--http-port`` is given and this
build has it); print where it listens, the device, the models and the memory budgets;
serve. The first SIGINT/SIGTERM starts a clean shutdown (native.py); a second one skips
the grace period. Then the engine closes every session (KV blocks and server-side
tensors freed) and stops its loop.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import signal
import sys
import threading
import time

from djinn.config import Config
from djinn.engine import Engine
from djinn.errors import InvalidRequest
from djinn.server.auth import check_bind
from djinn.server.journal import HTTP_OWNER
from djinn.server.native import NativeServer

log = logging.getLogger("djinn.server")
ENGINE_STOP_TIMEOUT_S = 30.0


def _mib(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def banner(engine: Engine, config: Config, address: tuple[str, int], http: str | None) -> str:
    """What the operator needs to see at start: where, on what, which models, which budgets."""
    stats = engine.stats()
    mem = stats["memory"]
    where = _where(*address)
    s = config.server
    lines = [f"djinn: listening on {where} (native protocol; clients: djinn.connect(\"{where}\"))"]
    budget = getattr(engine, "budget", None)
    explicit = engine.config.memory.kv_blocks is not None   # --kv-blocks overrides the budget's KV share
    lines.append(f"  device: {stats['device']}" + (f"; {budget.describe()}" if budget is not None and not explicit
                                                   else ""))
    for name, rt in engine.runtimes.items():
        kv = stats["kv_blocks"][name]
        lines.append(f"  model {name}: {rt.arch.num_layers} layers, {str(rt.loaded.dtype).removeprefix('torch.')}, "
                     f"weights {_mib(mem['weights_by_model'][name])}, KV pool {_mib(rt.pool.total_bytes)}: "
                     f"{kv['used'] + kv['free']} usable blocks of {rt.kv.block_size} tokens, {_mib(kv['block_bytes'])} "
                     "each")
    lines.append(f"  memory: weights {_mib(mem['weights'])}, KV capacity {_mib(mem['kv_device_capacity'])}, "
                 f"server-side tensors up to {_mib(engine.config.max_tensor_bytes_per_session)} per session")
    lines.append("  auth: " + ("token required in hello" if s.token else "no token (loopback only)")
                 + f"; session lease {s.lease_seconds:g} s; max message {_mib(s.max_message_bytes)}")
    running = s.max_running if s.max_running is not None else engine.config.max_batch
    lines.append(f"  limits: {s.max_queued} queued requests, {running} running generations, "
                 f"{s.max_sessions_per_key} sessions per key, "
                 + (f"{s.max_tokens_per_request} tokens per request" if s.max_tokens_per_request else
                    "tokens per request up to the context")
                 + (f"; journal {s.journal}" if s.journal else ""))
    if http:
        lines.append(f"  {http}")
    lines.append("  stop with Ctrl-C or SIGTERM")
    return "\n".join(lines)


def _start_http(engine: Engine, config: Config, loop: asyncio.AbstractEventLoop, journal=None) -> str | None:
    """The OpenAI-compatible front end, if this build has ``djinn.server.http.run_http``.

    Contract for that module: ``run_http(engine, config, port, host)``; a coroutine function
    runs as a task on the server's event loop, a plain function in a daemon thread (it may
    block, e.g. running its own event loop). With ``--journal`` it also gets ``journal=``: the
    front end notes its conversations there and adopts the ones restored (server/journal.py)."""
    port = config.server.http_port
    if port is None:
        return None
    try:
        run_http = importlib.import_module("djinn.server.http").run_http
    except (ImportError, AttributeError) as exc:   # named, so a missing dependency is obvious
        return f"HTTP API: not available in this build ({exc}; --http-port {port} ignored)"
    host = config.server.host
    kwargs = {} if journal is None else {"journal": journal}
    if inspect.iscoroutinefunction(run_http):
        loop.create_task(run_http(engine, config, port, host, **kwargs))
    else:
        threading.Thread(target=run_http, args=(engine, config, port, host), kwargs=kwargs, name="djinn-http",
                         daemon=True).start()
    return f"HTTP API (OpenAI-compatible): http://{_where(host, port)}/v1"


async def run_server(engine: Engine, config: Config, restored: list[tuple[str, str]] = (), journal=None) -> None:
    """Serve until SIGINT/SIGTERM, then shut the server down: the event-loop part of ``serve``.
    ``restored``: ``(session_id, owner)`` of sessions the journal brought back; each native one
    starts a lease at once, so one whose client never returns is closed like any abandoned
    session. The HTTP front end's (owner ``http:``) have no lease, like all its conversations:
    it adopts them (``journal``) and closes them as it closes any (DELETE, or eviction)."""
    loop = asyncio.get_running_loop()
    server = NativeServer(engine, config.server)
    address = await server.start()
    for sid, owner in restored:
        if not owner.startswith(HTTP_OWNER):
            server.leases.hold(sid, owner, conn=-1)   # no live connection holds it: its lease runs
    http = _start_http(engine, config, loop, journal)
    print(banner(engine, config, address, http), flush=True)
    stop = asyncio.Event()
    signals = {"count": 0}

    def on_signal(signum: int) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            print(f"djinn: {signal.Signals(signum).name}: shutting down (in-flight requests get "
                  f"{config.server.shutdown_grace_seconds:g} s; signal again to stop now)", flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):   # not the main thread, or not Unix
            pass
    await stop.wait()
    grace = asyncio.get_running_loop().create_task(server.stop(config.server.shutdown_grace_seconds))
    while not grace.done():
        await asyncio.wait([grace], timeout=0.05)
        if signals["count"] > 1:      # asked twice: no more waiting for in-flight requests
            for conn in list(server.connections):
                conn.abandon()
    await grace


def _stop_engine(engine: Engine) -> bool:
    """Close every session and stop the loop; False if it is still busy after the timeout."""
    t = threading.Thread(target=engine.shutdown, name="djinn-engine-stop", daemon=True)
    t.start()
    t.join(ENGINE_STOP_TIMEOUT_S)
    return not t.is_alive()


def serve(config: Config) -> int:
    """The ``djinn serve`` command. Returns the process exit code. Weight streaming
    (``--offload``, ``--stream-slots``) arrives through ``config.engine.memory``."""
    s = config.server
    check_bind(s.host, s.token)
    if s.lease_seconds < 0 or s.shutdown_grace_seconds < 0:
        raise InvalidRequest("--lease and the shutdown grace must be >= 0 seconds")
    if s.max_queued < 1 or s.max_sessions_per_key < 1 or (s.max_running is not None and s.max_running < 1) or (
            s.max_tokens_per_request is not None and s.max_tokens_per_request < 2):
        raise InvalidRequest("--max-queued, --max-running and --max-sessions-per-key must be >= 1, "
                             "--max-tokens-per-request >= 2")
    if s.max_message_bytes < 1 << 16:
        raise InvalidRequest("--max-message-size must be at least 64KiB")
    if s.token is not None and len(s.token) < 16:
        print("djinn: warning: the token is shorter than 16 characters; use a long random one "
              "(python -c 'import secrets; print(secrets.token_urlsafe(32))')", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="djinn: %(message)s", stream=sys.stderr)
    from djinn.engine.startup import build_engine

    t0 = time.perf_counter()
    engine = build_engine(config)
    print(f"djinn: loaded {', '.join(engine.runtimes)} in {time.perf_counter() - t0:.1f} s", flush=True)
    for name, took in engine.load_times.items():
        print(f"djinn: {name}: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in took.items()),
              flush=True)
    journal, restored = None, []
    if s.journal:
        from djinn.server.journal import Journal

        journal = Journal(s.journal, s.journal_sync)
        restored = journal.restore(engine)
        journal.attach(engine)
        print(f"djinn: journal {s.journal}: {len(restored)} session(s) restored"
              + (f", {journal.counters['restore_skipped']} skipped" if journal.counters["restore_skipped"] else ""),
              flush=True)
    try:
        asyncio.run(run_server(engine, config, restored, journal))
    finally:
        if journal is not None:
            journal.detach(engine)   # closing every session at shutdown must not empty the journal
        done = _stop_engine(engine)
        if journal is not None:
            journal.close()
        print("djinn: stopped; every session closed and its memory released" if done else
              "djinn: stopped; the engine was still busy with a request and is abandoned with the process",
              flush=True)
    return 0
