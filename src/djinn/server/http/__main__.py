"""``python -m djinn.server.http``: the OpenAI-compatible API alone, on an in-process engine.

For tests and for trying the API without the native server. Prints one line
``djinn-http listening on http://HOST:PORT/v1`` once it accepts requests; ``--port 0`` picks a
free port. Stops on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import torch

from djinn.memory.policy import POLICIES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m djinn.server.http")
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", action="append", default=None, help="an accepted API key (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--host-memory", default=None)
    p.add_argument("--policy", default="semantic", choices=list(POLICIES))
    p.add_argument("--kv-blocks", type=int, default=None, help="explicit device KV block count (tests)")
    p.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false",
                   help="store every session's KV privately (default: identical prefixes once, per owner)")
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)

    from djinn.client.embedded import resolve_device, resolve_dtype
    from djinn.config import EngineConfig, MemoryConfig, default_home
    from djinn.engine import Engine
    from djinn.models import load_model
    from djinn.server.http.config import HttpConfig
    from djinn.server.http.runner import run_http

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    mem = MemoryConfig(gpu_memory=args.gpu_memory, host_memory=args.host_memory, policy=args.policy,
                       kv_blocks=args.kv_blocks)
    engine = Engine(config=EngineConfig(device=args.device, dtype=args.dtype, prefix_sharing=args.prefix_sharing,
                                        memory=mem))
    for name in args.model:
        engine.add_model(name, load_model(name, device=device, dtype=dtype, home=default_home(), progress=False))
    cfg = HttpConfig(api_keys=args.token)
    if args.max_body_bytes:
        cfg.max_body_bytes = args.max_body_bytes
    server = run_http(engine, cfg, port=args.port, host=args.host)
    print(f"djinn-http listening on {server.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            if not server._thread.is_alive():
                return 1
    except KeyboardInterrupt:
        pass
    server.stop()
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
