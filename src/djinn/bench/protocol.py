"""``djinn bench protocol``: what the wire costs, over loopback, against a real server.

Starts ``djinn serve`` (tiny-llama on the CPU: the model only has to exist) as a child
process on a free port, unless ``--address`` names a running one, and measures with the
synchronous client (``RemoteBackend``):

- fixed cost of an empty request: ``echo`` with no tensors (client -> server's event loop ->
  client: framing, validation, dispatch), and ``stats`` (the same plus a hop through the
  engine's loop thread); p50 / p99 / mean of ``--requests`` round trips;
- tensor round trips, 4 KB .. 64 MB (float32): ``echo`` sends the tensor and gets it back
  (``both``), or sends it and gets an empty reply (``up``). Throughput is reported as tensor
  bytes / round-trip time (``payload_gbps``: one direction's bytes; the wire carried twice
  that in ``both``). The echoed tensor is checked equal to the one sent;
- the same round trips through a plain socket echo in another process (8-byte length +
  bytes, blocking ``recv_into``/``sendall``): the ceiling of this machine's loopback and
  Python, measured in the same run.

Why a dedicated ``echo`` op rather than resume/fetch: it isolates the transport (frames,
validation, the event loop, the socket) from the engine, whose own costs other benchmarks
measure, and it needs no model of a given size. Targets on the CPU machine: >= 1 GB/s
for 4 MB tensors and < 1 ms median empty round trip.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
import textwrap
import time

import torch

from djinn.bench.common import median, percentile, record, write

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 1 << 20, 4 << 20]
_RAW_ECHO = textwrap.dedent("""
    import socket, struct, sys
    ls = socket.create_server(("127.0.0.1", 0)); print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def fill(buf):
        v, pos = memoryview(buf), 0
        while pos < len(buf):
            got = c.recv_into(v[pos:])
            if not got: sys.exit(0)
            pos += got
    while True:
        head = bytearray(9); fill(head)
        n, back = struct.unpack("<QB", head)
        buf = bytearray(n); fill(buf)
        c.sendall(struct.pack("<Q", n if back else 0)); c.sendall(buf if back else b"")
""")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djinn bench protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="HOST:PORT of a running server (default: start one)")
    p.add_argument("--token", default=None)
    p.add_argument("--requests", type=int, default=2000, help="empty round trips for the fixed cost")
    p.add_argument("--seconds", type=float, default=1.5, help="time spent per tensor size and direction")
    p.add_argument("--quick", action="store_true", help="fewer sizes and requests (a smoke run)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-socket baseline")
    p.add_argument("--out", default=None)
    return p


def _latency(fn, n: int) -> dict:
    for _ in range(min(50, n)):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return {"p50_us": median(times), "p99_us": percentile(times, 99), "mean_us": sum(times) / n, "n": n}


def _round_trips(fn, seconds: float, min_reps: int = 5, max_reps: int = 500) -> list[float]:
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < seconds and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _row(size: int, times: list[float]) -> dict:
    mid = median(times)
    return {"median_ms": mid * 1e3, "p10_ms": percentile(times, 10) * 1e3, "p90_ms": percentile(times, 90) * 1e3,
            "payload_gbps": size / mid / 1e9, "reps": len(times)}


class _RawEcho:
    """The baseline: a plain blocking-socket echo in another Python process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _RAW_ECHO], stdout=subprocess.PIPE, text=True)
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _fill(self, buf: bytearray) -> None:
        view, pos = memoryview(buf), 0
        while pos < len(buf):
            pos += self.sock.recv_into(view[pos:])

    def __call__(self, data: memoryview, back: bool) -> None:
        self.sock.sendall(struct.pack("<QB", len(data), int(back)))
        self.sock.sendall(data)
        head = bytearray(8)
        self._fill(head)
        self._fill(bytearray(struct.unpack("<Q", head)[0]))

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)


def run(args: argparse.Namespace) -> dict:
    from djinn.client.remote import RemoteBackend

    sizes = QUICK_SIZES if args.quick else SIZES
    n_requests = min(args.requests, 300) if args.quick else args.requests
    seconds = min(args.seconds, 0.4) if args.quick else args.seconds
    server = None
    if args.address is None:
        from djinn.server.launch import ServerProcess

        print("starting djinn serve (tiny-llama, cpu) on a free port ...", flush=True)
        server = ServerProcess("--kv-blocks", "16", env={"OMP_NUM_THREADS": "1"}).start()
        args.address = server.address
    backend = RemoteBackend(args.address, token=args.token)
    raw = None if args.no_baseline else _RawEcho()
    try:
        results: dict = {"address": args.address, "server_started_here": server is not None}
        print(f"empty round trips ({n_requests}) ...", flush=True)
        results["empty_echo"] = _latency(backend.echo, n_requests)
        results["empty_stats_via_engine"] = _latency(lambda: backend.call("stats"), max(50, n_requests // 4))
        if raw is not None:
            results["empty_raw_socket"] = _latency(lambda: raw(memoryview(b""), True), n_requests)
        for key in ("empty_echo", "empty_stats_via_engine", "empty_raw_socket"):
            if key in results:
                r = results[key]
                print(f"  {key:<24} p50 {r['p50_us']:8.1f} us   p99 {r['p99_us']:8.1f} us", flush=True)
        results["tensors"] = {}
        for size in sizes:
            x = torch.randn(size // 4, generator=torch.Generator().manual_seed(size))
            assert torch.equal(backend.echo([x])[0], x), "the echoed tensor differs from the one sent"
            row = {"both": _row(size, _round_trips(lambda: backend.echo([x]), seconds)),
                   "up": _row(size, _round_trips(lambda: backend.call("echo", {"data": []}, [x]), seconds))}
            if raw is not None:
                data = memoryview(x.numpy()).cast("B")
                row["raw_socket_both"] = _row(size, _round_trips(lambda: raw(data, True), seconds))
                row["raw_socket_up"] = _row(size, _round_trips(lambda: raw(data, False), seconds))
            results["tensors"][str(size)] = row
            base = f"; plain socket {row['raw_socket_both']['payload_gbps']:.2f} GB/s" if raw is not None else ""
            print(f"  {size / 2**20:9.3f} MiB  both {row['both']['median_ms']:8.3f} ms = "
                  f"{row['both']['payload_gbps']:5.2f} GB/s   up {row['up']['payload_gbps']:5.2f} GB/s{base}", flush=True)
        four = results["tensors"].get(str(4 << 20), {}).get("both")
        results["targets"] = {
            "empty_p50_under_1ms": results["empty_echo"]["p50_us"] < 1000,
            "4MB_at_least_1GBps": None if four is None else four["payload_gbps"] >= 1.0,
        }
        print(f"targets: {results['targets']}", flush=True)
        return results
    finally:
        backend.close()
        if raw is not None:
            raw.close()
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results = run(args)
    params = {k: v for k, v in vars(args).items() if k != "token"}
    write(record("protocol", torch.device("cpu"), params, results), args.out)
    return 0
