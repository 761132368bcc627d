"""``djinn bench fuzz``: hypothesis against a running ``djinn serve``, end to end.

The protocol's own fuzz tests (tests/protocol/test_fuzz.py) drive the decoder and the
validators in-process; this drives a real server subprocess over its socket with:
- *requests*: every op (and unknown ones) with each field absent, plausible (the live
  session's id, the loaded model, short prompts, real layers) or junk of any msgpack type,
  plus payload tensors of random dtypes and shapes;
- *raw frames*: random bytes, valid frames cut short, wrong magic or version, oversized
  declared lengths, tensor descriptors that lie about dtype, shape or size.

The property, per case: every reply is a well-formed frame answering its request, ``ok`` or a
*typed* error (a djinn error code other than the internal one); a frame the server cannot read
is answered with an error of id 0 and the connection closed; nothing hangs (socket timeouts);
the server process stays up. At the end: a well-formed client's greedy generation equals what
it was before the fuzzing, and once the fuzzing connections' leases end the server holds
exactly what it held before (sessions, KV blocks, server-side tensors).

Failures are collected, not raised (no shrinking), so the count of cases is the count run.
Run: ``djinn bench fuzz --cases 5000 --out benchmarks/results``.
"""

from __future__ import annotations

import argparse
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

import djinn
from djinn import errors
from djinn.protocol import PROTOCOL_VERSION, REQUESTS, encode_message, recv_message, send_message

MODEL = "tiny-llama"
TOKEN = "fuzz-token-" + "z" * 24
LIMIT = 256 << 10                 # the server's message limit: small, so oversized cases are cheap
READ_TIMEOUT = 20.0               # longer than any legitimate reply here; past it: a hang
PREFIX = struct.Struct("<2sBBIQ")
TYPED = {c.code for c in vars(errors).values()
         if isinstance(c, type) and issubclass(c, errors.DjinnError) and c is not errors.DjinnError}

# ---- strategies ---------------------------------------------------------------------------------
INT64 = st.integers(-(2**63), 2**64 - 1)
junk = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats() | st.text(max_size=12) | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
VOCAB = 259                       # tiny-llama's byte vocabulary
small_tokens = st.lists(st.integers(-3, VOCAB + 5), min_size=0, max_size=12)
layer = st.integers(-2, 10) | st.sampled_from([4095, 4096])
small_float = st.floats(-2.0, 3.0) | st.sampled_from([float("nan"), float("inf"), 0.0, 1.0])
positions = st.none() | st.lists(st.integers(-40, 40), max_size=4)
intervention = st.fixed_dictionaries(
    {"kind": st.sampled_from(["scale", "add", "zero", ""]), "layer": layer},
    optional={"factor": small_float, "vector": st.integers(-1, 3) | junk, "positions": positions},
)
expr = st.recursive(
    st.fixed_dictionaries({"op": st.just("ref"), "id": st.text(max_size=34)})
    | st.fixed_dictionaries({"op": st.just("const"), "value": small_float})
    | st.fixed_dictionaries({"op": st.just("tensor"), "index": st.integers(-1, 3)}),
    lambda inner: st.fixed_dictionaries({"op": st.sampled_from(["add", "mul", "sub", "getitem", "nope"]),
                                         "args": st.lists(inner | junk, max_size=3)}),
    max_leaves=6,
)


def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` four times in five, else ``bad`` (so whole requests are often valid)."""
    return st.integers(0, 4).flatmap(lambda i: bad if i == 4 else good)   # hypothesis leans to 0: good


LIVE = {"session": "\x00live:session", "tensor": "\x00live:tensor", "paused": "\x00live:paused"}


def _plausible(name: str) -> st.SearchStrategy:
    """A value of the right kind for field ``name``: mostly valid, sometimes out of range. Ids the
    server handed out are drawn as ``LIVE`` placeholders and filled in when the case is sent (a
    strategy must not depend on state outside hypothesis)."""
    def ids(key: str) -> st.SearchStrategy:
        return _mostly(st.sampled_from([LIVE[key]] * 3 + [v for k, v in LIVE.items() if k != key]),
                       st.text(max_size=40))

    table: dict[str, st.SearchStrategy] = {
        "session_id": ids("session"), "tensor_id": ids("tensor"), "paused_id": ids("paused"),
        "model": _mostly(st.just(MODEL), st.sampled_from(["no-such-model", "/etc/passwd", "../../x", "gpt2", ""])),
        "prompt": _mostly(st.text(min_size=1, max_size=20) | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
                          st.text(max_size=3) | small_tokens),
        "max_new_tokens": _mostly(st.integers(1, 6), st.sampled_from([-1, 0, (1 << 20) + 1, 2**40])),
        "temperature": _mostly(st.sampled_from([0.0, 0.7, 1.0]), small_float),
        "top_p": _mostly(st.sampled_from([1.0, 0.9]), small_float), "top_k": _mostly(st.integers(0, 50), st.just(-1)),
        "seed": _mostly(st.none() | st.integers(0, 2**32), st.integers(-1, 2**64 - 1)),
        "stop": _mostly(st.lists(st.text(min_size=1, max_size=5), max_size=2), st.lists(st.text(max_size=5), max_size=3)),
        "stop_token_ids": _mostly(st.lists(st.integers(0, VOCAB - 1), max_size=3), small_tokens),
        "chat": st.none() | st.booleans(), "ignore_eos": st.booleans(),
        "interventions": _mostly(st.just([]), st.lists(intervention, max_size=2)),
        "capture": _mostly(st.lists(st.integers(0, 1), max_size=2, unique=True), st.lists(layer, max_size=3)),
        "breakpoint": _mostly(st.none(), layer | st.fixed_dictionaries({"layer": layer, "step": st.integers(-1, 4)})),
        "phase": _mostly(st.sampled_from(["IO_WAIT", "ACTIVE"]), st.sampled_from(["PAUSED", "io_wait", ""])),
        "input_ids": _mostly(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10), small_tokens | st.integers(-1, 3)),
        "activation": st.none() | st.integers(-1, 3) | expr, "expr": st.none() | expr,
        "target_id": st.integers(0, 40), "data": st.lists(st.integers(-1, 3), max_size=3),
        "version": st.integers(0, 3), "token": st.none() | st.text(max_size=40), "client": st.text(max_size=10),
        "client_key": st.none() | st.text(min_size=16, max_size=20),
    }
    return table.get(name, junk)


@st.composite
def tensor(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                  torch.int8, torch.uint8, torch.bool]))
    shape = draw(st.lists(st.integers(0, 5), max_size=3) | st.sampled_from([[1, 3, 64], [64], [1, 1]]))
    return torch.ones(shape, dtype=dtype) if dtype is not torch.bool else torch.zeros(shape, dtype=torch.bool)


@st.composite
def request(draw) -> tuple[dict, list[torch.Tensor]]:
    op = draw(st.sampled_from(sorted(REQUESTS) + ["bogus", ""]))
    fields = getattr(REQUESTS.get(op), "fields", None) or {}
    header: dict[str, Any] = {"op": op}
    wild = draw(st.booleans())          # a tame case changes a field in 1 of ~20, a wild one in 1 of 4
    for name in fields:
        how = draw(st.sampled_from(["plausible"] * (6 if wild else 40) + ["absent", "junk"]))
        if how != "absent":
            header[name] = draw(_plausible(name) if how == "plausible" else junk)
    if draw(st.integers(0, 9)) == 9:
        header[draw(st.text(max_size=8))] = draw(junk)       # a field no op has
    return header, draw(st.lists(tensor(), max_size=2))


@st.composite
def raw_bytes(draw) -> tuple[str, bytes]:
    """One unreadable-or-suspicious frame and the kind of damage."""
    kind = draw(st.sampled_from(["random", "truncated", "version", "magic", "oversized", "lying_tensor"]))
    head = msgpack.packb({"op": "stats", "id": 7}, use_bin_type=True)
    if kind == "random":
        return kind, draw(st.binary(max_size=300))
    if kind == "truncated":
        parts = encode_message({"op": "echo", "id": 9, "data": [0]}, [torch.arange(draw(st.integers(1, 64)))])
        whole = b"".join(bytes(p) for p in parts)
        return kind, whole[:draw(st.integers(0, len(whole) - 1))]
    if kind == "version":
        v = draw(st.integers(0, 255).filter(lambda x: x != PROTOCOL_VERSION))
        return kind, PREFIX.pack(b"DJ", v, 0, len(head), 0) + head
    if kind == "magic":
        magic = draw(st.binary(min_size=2, max_size=2).filter(lambda m: m != b"DJ"))
        return kind, PREFIX.pack(magic, PROTOCOL_VERSION, 0, len(head), 0) + head
    if kind == "oversized":
        hl = draw(st.integers(LIMIT, 2**32 - 1))
        pl = draw(st.integers(0, 2**64 - 1))
        return kind, PREFIX.pack(b"DJ", PROTOCOL_VERSION, 0, hl, pl) + head
    # a tensor descriptor that lies about its dtype, shape or size
    desc = draw(st.fixed_dictionaries({
        "dtype": st.sampled_from(["float32", "int64", "bfloat16", "complex64", "", "object"]) | junk,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | junk,
        "nbytes": st.integers(-1, 2**40) | junk}))
    hdr = msgpack.packb({"op": "echo", "id": 3, "data": [0], "tensors": [desc]}, use_bin_type=True)
    payload = draw(st.binary(max_size=64))
    plen = draw(st.sampled_from([len(payload), len(payload) + 8, max(0, len(payload) - 1)]))
    return kind, PREFIX.pack(b"DJ", PROTOCOL_VERSION, 0, len(hdr), plen) + hdr + payload


# ---- the harness --------------------------------------------------------------------------------
@dataclass
class Outcome:
    cases: dict[str, int] = field(default_factory=dict)          # kind -> count
    replies: dict[str, int] = field(default_factory=dict)        # ok / error code -> count
    failures: list[dict] = field(default_factory=list)
    unsendable: int = 0                                          # our side could not encode it
    by_op: dict[str, dict[str, int]] = field(default_factory=dict)   # op -> {"ok": n, "error": n}
    error_samples: dict[str, list[str]] = field(default_factory=dict)  # op -> a few error messages

    def count(self, kind: str) -> None:
        self.cases[kind] = self.cases.get(kind, 0) + 1

    def fail(self, kind: str, why: str, case: Any) -> None:
        if len(self.failures) < 50:
            self.failures.append({"kind": kind, "why": why, "case": repr(case)[:600]})
        else:
            self.failures.append({"kind": kind, "why": why})

    @property
    def total(self) -> int:
        return sum(self.cases.values())


class Fuzzer:
    def __init__(self, host_port: tuple[str, int], token: str | None, alive=lambda: True):
        self.host_port, self.token, self.alive = host_port, token, alive
        self.out = Outcome()
        self.sock: socket.socket | None = None
        self.ids = iter(range(100, 1 << 62))
        self.live: dict[str, str] = {}

    # -- connections
    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.host_port, timeout=READ_TIMEOUT)
        send_message(sock, {"op": "hello", "id": 1, "version": PROTOCOL_VERSION, "token": self.token})
        reply = recv_message(sock).header
        if not reply.get("ok"):
            raise RuntimeError(f"the fuzzer's hello was refused: {reply}")
        return sock

    def _session(self) -> socket.socket:
        if self.sock is None:
            self.sock = self._connect()
            self.live = {}
        if "session" not in self.live or next(self.ids) % 40 == 0:   # a fresh session now and then
            send_message(self.sock, {"op": "session_open", "id": 2, "model": MODEL})
            self.live["session"] = recv_message(self.sock).header["session_id"]
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _check(self, kind: str, header: dict, case: Any) -> None:
        key = "ok" if header.get("ok") else (header.get("error") or {}).get("code", "?")
        self.out.replies[key] = self.out.replies.get(key, 0) + 1
        if header.get("ok") is True:
            return
        err = header.get("error")
        if not isinstance(err, dict) or err.get("code") not in TYPED:
            self.out.fail(kind, f"untyped error reply: {header}", case)

    # -- one request
    def request_case(self, header: dict, tensors: list[torch.Tensor]) -> None:
        self.out.count("request")
        sock = self._session()
        rid = next(self.ids)
        names = {v: k for k, v in LIVE.items()}
        header = {k: (self.live.get(names[v], "none-yet") if isinstance(v, str) and v in names else v)
                  for k, v in header.items()}
        header["id"] = rid
        try:
            parts = encode_message(header, tensors)
        except (errors.DjinnError, TypeError, ValueError, OverflowError):
            self.out.unsendable += 1
            return
        try:
            for p in parts:
                sock.sendall(p)
            while True:
                reply = recv_message(sock).header
                if reply.get("id") == rid:
                    break
                if reply.get("id") == 0:         # a frame the server could not read: it hangs up
                    self.close()
                    break
        except TimeoutError:
            self.out.fail("request", "no reply within the timeout", header)
            self.close()
            return
        except (OSError, errors.ProtocolError) as exc:
            self.out.fail("request", f"connection lost without a reply: {exc!r}", header)
            self.close()
            return
        self._check("request", reply, header)
        tally = self.out.by_op.setdefault(str(header.get("op")), {"ok": 0, "error": 0})
        tally["ok" if reply.get("ok") else "error"] += 1
        if not reply.get("ok"):
            seen = self.out.error_samples.setdefault(str(header.get("op")), [])
            if len(seen) < 3:
                seen.append(str((reply.get("error") or {}).get("message"))[:200])
        self._remember(header, reply)
        if not self.alive():
            self.out.fail("request", "the server process died", header)

    def _remember(self, header: dict, reply: dict) -> None:
        """Ids the server handed out become plausible values of later cases."""
        if not reply.get("ok"):
            return
        for key in ("logits", "paused"):
            ref = reply.get(key)
            if isinstance(ref, dict):
                if "paused_id" in ref:
                    self.live["paused"] = ref["paused_id"]
                    ref = ref.get("activation") or {}
                if "id" in ref:
                    self.live["tensor"] = ref["id"]

    # -- one raw frame, on its own connection
    def raw_case(self, kind: str, data: bytes) -> None:
        self.out.count("raw:" + kind)
        try:
            sock = self._connect()
        except (OSError, errors.ProtocolError, RuntimeError) as exc:
            self.out.fail("raw:" + kind, f"could not connect: {exc!r}", data[:64])
            return
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)      # the frame ends here: the server must not wait for more
            while True:
                try:
                    reply = recv_message(sock).header
                except errors.ProtocolError:   # ConnectionClosed included: the server hung up
                    break
                self._check("raw:" + kind, reply, data[:64])
        except TimeoutError:
            self.out.fail("raw:" + kind, "the server neither answered nor hung up", data[:64])
        except OSError:
            pass                                # reset by the server after its error reply: fine
        finally:
            sock.close()
        if not self.alive():
            self.out.fail("raw:" + kind, "the server process died", data[:64])


def run_fuzz(fuzzer: Fuzzer, requests: int, raw: int, seed: int = 0) -> Outcome:
    """``requests`` structured cases and ``raw`` frame cases (hypothesis, reproducible by ``seed``)."""
    common = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=False)

    @hseed(seed)
    @settings(max_examples=max(1, requests), **common)
    @given(st.data())
    def structured(data):
        header, tensors = data.draw(request())
        fuzzer.request_case(header, tensors)

    @hseed(seed + 1)
    @settings(max_examples=max(1, raw), **common)
    @given(raw_bytes())
    def frames(case):
        fuzzer.raw_case(*case)

    if requests:
        fuzzer._session()
        structured()
    if raw:
        frames()
    fuzzer.close()
    return fuzzer.out


def settle(client, baseline: tuple, timeout: float = 30.0) -> tuple:
    """Wait for leases to end and the server's holdings to return to ``baseline``."""
    deadline = time.monotonic() + timeout
    while True:
        s = client.stats()
        now = (s["sessions"], s["kv_blocks"][MODEL]["used"], s["memory"]["tensors"])
        if now == baseline or time.monotonic() > deadline:
            return now
        time.sleep(0.25)


def fuzz_server(requests: int, raw: int, seed: int = 0, progress=print) -> dict:
    """Start a server, fuzz it, check a good client and the memory afterwards: the results record."""
    from djinn.server.launch import ServerProcess

    srv = ServerProcess("--kv-blocks", "512", "--lease", "1", "--max-message-size", f"{LIMIT}B", token=TOKEN,
                        env={"OMP_NUM_THREADS": "1"}).start()
    try:
        good = djinn.connect(srv.address, token=TOKEN)
        prompt = [3, 14, 15, 92, 65]
        before = good.model(MODEL).session().generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids
        s = good.stats()
        baseline = (s["sessions"], s["kv_blocks"][MODEL]["used"], s["memory"]["tensors"])
        t0 = time.perf_counter()
        fuzzer = Fuzzer(srv.host_port, TOKEN, alive=srv.alive)
        out = run_fuzz(fuzzer, requests, raw, seed)
        elapsed = time.perf_counter() - t0
        progress(f"fuzz: {out.total} cases in {elapsed:.1f} s ({out.unsendable} unsendable), "
                 f"{len(out.failures)} failures; replies {out.replies}")
        after = good.model(MODEL).session().generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids
        held = settle(good, (baseline[0] + 1, baseline[1] + 1, 0))   # + the session just opened (1 block)
        good.close()
        return {"cases": out.total, "cases_by_kind": out.cases, "unsendable": out.unsendable,
                "replies": out.replies, "by_op": out.by_op, "error_samples": out.error_samples, "failures": len(out.failures), "failure_samples": out.failures[:20],
                "server_alive": srv.alive(), "good_client_same_output": before == after,
                "held_after": list(held), "held_expected": [baseline[0] + 1, baseline[1] + 1, 0],
                "seconds": elapsed}
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    from djinn.bench.common import record, write

    p = argparse.ArgumentParser(prog="djinn bench fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=2000, help="total cases (2/3 requests, 1/3 raw frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    requests = args.cases * 2 // 3
    res = fuzz_server(requests, args.cases - requests, args.seed)
    ok = (res["failures"] == 0 and res["server_alive"] and res["good_client_same_output"]
          and res["held_after"] == res["held_expected"])
    res["passed"] = ok
    write(record("fuzz", torch.device("cpu"), {"cases": args.cases, "seed": args.seed, "model": MODEL,
                                               "max_message_bytes": LIMIT}, res), args.out)
    print("fuzz: PASSED" if ok else "fuzz: FAILED")
    return 0 if ok else 1
