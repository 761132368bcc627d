"""The ``djinn`` command. Builds a ``Config`` from arguments and the environment (the only
place that reads ``DJINN_*`` variables) and hands it to the part that does the work."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from djinn.config import Config, EngineConfig, MemoryConfig, ServerConfig, default_home, parse_size
from djinn.errors import DjinnError
from djinn.memory.policy import POLICIES

BENCHES = ("agents", "resume", "whitebox", "swap", "stream", "protocol", "decode", "plot", "fuzz", "soak", "fork", "ties")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (default: auto)")
    p.add_argument("--gpu-memory", default=None, help="device budget: 40GiB, 512MiB or a fraction like 0.8")
    p.add_argument("--host-memory", default=None, help="pinned host memory for parked KV, e.g. 64GiB")
    p.add_argument("--policy", default="semantic", choices=list(POLICIES))
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of random-init presets")


def _config(args: argparse.Namespace) -> Config:
    mem = MemoryConfig(gpu_memory=getattr(args, "gpu_memory", None), host_memory=getattr(args, "host_memory", None),
                       policy=getattr(args, "policy", "semantic"), block_size=getattr(args, "block_size", 16),
                       offload=True if getattr(args, "offload", False) else None,
                       stream_slots=getattr(args, "stream_slots", None), stream_chunk=getattr(args, "stream_chunk", None),
                       kv_blocks=getattr(args, "kv_blocks", None))
    engine = EngineConfig(device=getattr(args, "device", "auto"), dtype=getattr(args, "dtype", "auto"),
                          seed=getattr(args, "seed", 0), prefix_sharing=getattr(args, "prefix_sharing", True),
                          memory=mem)
    server = ServerConfig(host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", 5556),
                          # an explicit --token "" is refused by serve(); an empty DJINN_TOKEN counts as unset
                          token=args.token if getattr(args, "token", None) is not None
                          else os.environ.get("DJINN_TOKEN") or None,
                          http_port=getattr(args, "http_port", None))
    for name in ("max_queued", "max_running", "max_sessions_per_key", "max_tokens_per_request"):
        if getattr(args, name, None) is not None:
            setattr(server, name, getattr(args, name))
    if getattr(args, "journal", None) is not None:
        server.journal = args.journal
        server.journal_sync = args.journal_sync
    if getattr(args, "lease", None) is not None:
        server.lease_seconds = args.lease
    if getattr(args, "max_message_size", None) is not None:
        server.max_message_bytes = parse_size(args.max_message_size)
    return Config(models=list(getattr(args, "model", None) or []), home=default_home(), engine=engine, server=server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="djinn", description="A GPU server that many LLM sessions share.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded demo (server and client in this process)")
    demo.add_argument("--model", default=None, help="model to use (default: smollm2-135m if pulled, else tiny-llama)")
    _engine_args(demo)
    # the demo shows a park and a restore: every IO_WAIT parks (the server's default, semantic,
    # parks only when the memory is needed, which it is not in the demo's roomy pool)
    demo.set_defaults(policy="semantic-park")

    serve = sub.add_parser("serve", help="serve models to remote clients")
    serve.add_argument("--model", action="append", required=True, help="model to load (repeatable)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5556)
    serve.add_argument("--token", default=None, help="shared secret clients must present (or DJINN_TOKEN)")
    serve.add_argument("--http-port", type=int, default=None, help="also serve the OpenAI-compatible HTTP API")
    serve.add_argument("--offload", action="store_true", help="stream weights from host memory")
    serve.add_argument("--stream-slots", type=int, default=None, help="device ring slots for weight streaming")
    serve.add_argument("--stream-chunk", default=None, help="bytes per weight copy, e.g. 64MiB (default: a layer)")
    serve.add_argument("--lease", type=float, default=None, metavar="SECONDS",
                       help="how long a dropped client's sessions wait for it to reconnect (default 300)")
    serve.add_argument("--max-message-size", default=None, metavar="SIZE",
                       help="largest message a client may send or receive (default 256MiB)")
    serve.add_argument("--max-queued", type=int, default=None, metavar="N",
                       help="compute requests that may wait for the engine; more get CapacityError (default 256)")
    serve.add_argument("--max-running", type=int, default=None, metavar="N",
                       help="native generates running at once (in the batch); more get CapacityError "
                            "(default: the engine's batch size, 64)")
    serve.add_argument("--max-sessions-per-key", type=int, default=None, metavar="N",
                       help="sessions one token / client key may own at once (default 1024)")
    serve.add_argument("--max-tokens-per-request", type=int, default=None, metavar="N",
                       help="prompt + max_new_tokens of one generate (default: the model's context)")
    serve.add_argument("--journal", default=None, metavar="PATH",
                       help="record each session's committed history in this SQLite file; a restarted server "
                            "continues those sessions (their KV is recomputed on first use)")
    serve.add_argument("--journal-sync", default="normal", choices=["normal", "full"],
                       help="normal: survives a process crash; full: fsync every turn, survives a machine crash")
    serve.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false",
                       help="store every session's KV privately (default: full KV blocks of identical "
                            "prefixes are stored once, per owner)")
    serve.add_argument("--kv-blocks", type=int, default=None,
                       help="explicit number of device KV blocks per model (overrides the budget; tests)")
    _engine_args(serve)

    models = sub.add_parser("models", help="list or fetch models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="presets and models in the local cache")
    pull = msub.add_parser("pull", help="fetch a model into the local cache (once; offline after)")
    pull.add_argument("name")

    bench = sub.add_parser("bench", help="reproducible experiments (JSON + PNG out)")
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see djinn bench NAME --help)")
    return parser


def _models(args: argparse.Namespace) -> int:
    from djinn.models import list_models, pull

    home = default_home()
    if args.models_command == "pull":
        path = pull(args.name, home)
        print(f"{args.name} is in {path}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Models (cache: {home / 'models'})")
    for col in ("name", "kind", "params", "description"):
        table.add_column(col)
    for row in list_models(home):
        params = row.get("params")
        table.add_row(row["name"], row["kind"], f"{params / 1e6:,.0f}M" if params else "", row.get("description", ""))
    Console().print(table)
    print("Add a model: a local transformers directory or .gguf file by path, or `djinn models pull smollm2-135m`.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            return _models(args)
        if args.command == "demo":
            from djinn.demo import run_demo

            return run_demo(_config(args), model=args.model)
        if args.command == "serve":
            from djinn.server import serve

            return serve(_config(args))
        if args.command == "bench":
            module = importlib.import_module(f"djinn.bench.{args.name}")
            return module.main(args.rest)
    except DjinnError as exc:
        print(f"djinn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
