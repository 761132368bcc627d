"""``djinn bench soak``: a long seeded random workload against one ``djinn serve`` (native
protocol and the HTTP API at once), then the checks a shared server is judged by.

Workload (``--workers`` native threads and ``--http-workers`` HTTP threads, each with its own
seeded ``random.Random``): open a session, run 1-6 turns of token prompts (greedy); between
turns, at random: an IO_WAIT/ACTIVE phase signal pair, a turn stopped at a breakpoint and
resumed, a turn with a no-op intervention (``Scale(factor=1.0)``); at the end: close the
session, or drop the connection without closing (its lease closes it). HTTP workers hold
chat conversations of a few turns. The device budget (``--kv-blocks``) is below what the
sessions hold together, so sessions are parked and restored throughout.

Checks (all asserted; the JSON says which failed):
- wrong outputs: every native turn of one session in ``--check-every`` is compared with
  transformers' greedy ``generate`` on the session's full history (the oracle, in this
  process, on the same weights); HTTP conversations: the last answer of one in
  ``--check-every`` equals the answer to the same messages sent as a fresh conversation;
- memory: once everything is closed and leases have ended, sessions, device KV blocks,
  parked KV and server-side tensor bytes are back to their values at the start;
- latency: p99 turn latency of the last tenth of the run within ``--max-drift`` (1.2x) of
  the first tenth (native turns);
- threads: after everything closed, the server has no thread it did not have after the warm-up,
  except threads of its event loops' default executors, bounded pools that fill on demand
  (``_threads_check``); open file descriptors no more than the most seen in the first half.
- errors: every error counted is unexpected. A CapacityError (the server's admission under
  load) is expected and counted apart: a refused turn is skipped, a refused resume retried (the
  session stays paused until its resume runs).
- a divergence from the reference is a wrong output unless, at every step, the reference's
  logit of the served token is within the tie tolerance of its best (rounding of a different
  batch composition or kernel picking the other of two near-equal tokens): counted apart as a
  near-tie, with its logit gaps in the JSON. The tolerance is ``--tie-tolerance``, or calibrated
  at the start from the measured difference between the server's and the reference's logits.

The reference can run on the GPU (``--ref-device cuda``) for a large preset (``--model
llama2-7b``), in the server's dtype (``--dtype``).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import threading
import time

import torch

import djinn
from djinn.client.whitebox import Paused

MODEL = "tiny-llama"
TOKEN = "soak-token-" + "s" * 24
# Two correct computations of the same logits differ by rounding: on tiny-llama (float32, CPU)
# the engine's paged forward and transformers' forward on the same weights differ by at most
# 2.4e-7 (logits of magnitude <= 0.5). A served token counts as a near-tie (not a wrong output)
# only if, at every step, its reference logit is within the tolerance of the reference's best.
# The tolerance is calibrated at the start of each soak: TIE_FACTOR times the largest difference
# between the server's logits (a ``forward``, fetched) and the reference's on the same tokens,
# at least TIE_TOLERANCE (1e-5 on tiny-llama: 40x its rounding, far below the median top-2
# margin of a step, 0.04), so a GPU / float16 server gets a tolerance of its own rounding.
TIE_TOLERANCE = 1e-5
TIE_FACTOR = 40.0


def _proc_counts(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else 0.0


class Soak:
    def __init__(self, address: str, http_url: str | None, seed: int, check_every: int, deadline: float,
                 tie_tolerance: float = TIE_TOLERANCE, model: str = MODEL, ref_device: str = "cpu",
                 dtype: str = "auto"):
        self.address, self.http_url, self.seed = address, http_url, seed
        self.model, self.ref_device, self.dtype = model, ref_device, dtype
        self.vocab = 259                                  # tiny-llama's; the reference's config when loaded
        self.check_every, self.deadline, self.tie_tolerance = check_every, deadline, tie_tolerance
        self.lock = threading.Lock()
        self.turns: list[tuple[float, float]] = []      # (when, latency s) of native turns
        self.http_turns = 0
        self.checked = {"native_turns": 0, "http_conversations": 0}
        self.wrong: list[str] = []
        self.near_ties: list[dict] = []                   # divergences within the tie tolerance
        self.errors: list[str] = []                       # unexpected: any of these fails the soak
        self.error_kinds: collections.Counter = collections.Counter()
        self.counts = {"sessions": 0, "breakpoints": 0, "interventions": 0, "phase_signals": 0, "closes": 0,
                       "disconnects": 0, "capacity_refusals": 0, "resume_retries": 0}
        self._model = None

    def load_reference(self) -> None:
        from djinn.config import default_home
        from djinn.models import load_model

        with self.lock:
            if self._model is None:   # the preset's weights: the same seed (0) as the server's
                dtype = None if self.dtype == "auto" else getattr(torch, self.dtype)
                self._model = load_model(self.model, device=torch.device(self.ref_device), dtype=dtype,
                                         home=default_home(), progress=False).model
                self.vocab = self._model.config.vocab_size

    def _ref(self, history: list[int], n: int) -> list[int]:
        self.load_reference()
        with self.lock:
            ids = torch.tensor([history], device=self._model.device)
            out = self._model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
        return out[0, len(history):].tolist()

    def calibrate(self, client, sessions: int = 6) -> float:
        """The largest |server logits - reference logits| over a few forwards (the second of
        each over a cached prefix), on token ids drawn from a fixed seed."""
        self.load_reference()
        rng = random.Random(12345)
        worst = 0.0
        for _ in range(sessions):
            s = client.model(self.model).session()
            history: list[int] = []
            for _ in range(2):
                ids = [rng.randrange(3, self.vocab) for _ in range(rng.randint(8, 40))]
                got = s.forward(ids).logits.fetch().float()
                history += ids
                with self.lock, torch.inference_mode():
                    ref = self._model(torch.tensor([history], device=self._model.device)).logits[0].float().cpu()
                n = min(len(got), len(ids))
                worst = max(worst, float((got[-n:] - ref[-n:]).abs().max()))
            s.close()
        return worst

    def _judge(self, history: list[int], got: list[int], ref: list[int]) -> dict | None:
        """None if ``got`` is the reference's greedy continuation. Else the evidence: one forward
        of the reference over ``history + got`` gives, at each step, the gap between its best
        logit and the logit of the token the server chose; ``near_tie`` if every gap is within
        the tolerance (the server's tokens are greedy up to rounding), a wrong output if not."""
        if got == ref:
            return None
        with self.lock, torch.inference_mode():
            ids = torch.tensor([history + got], device=self._model.device)
            logits = self._model(ids).logits[0, len(history) - 1: len(history) - 1 + len(got)].float().cpu()
        rows = torch.arange(len(got))
        gaps = logits.max(-1).values - logits[rows, torch.tensor(got)]
        k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        top2 = logits[k].topk(2).values if k < len(got) else None
        ev = {"history_len": len(history), "got": got, "reference": ref, "diverges_at": k,
              "max_gap": float(gaps.max()), "gaps": [float(g) for g in gaps],
              "top2_margin_at_divergence": None if top2 is None else float(top2[0] - top2[1]),
              "ref_minus_got_at_divergence": (float(logits[k, ref[k]] - logits[k, got[k]])
                                              if k < len(got) and k < len(ref) else None)}
        ev["near_tie"] = len(got) == len(ref) and ev["max_gap"] <= self.tie_tolerance
        return ev

    def _error(self, where: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{where}: {type(exc).__name__}: {exc}"[:300])
            self.error_kinds[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1

    def _resume(self, paused):
        """Finish a paused generation. A resume is a compute request like any other, so an
        overloaded server refuses it with CapacityError; the session stays paused, and the only
        correct client move is to retry the resume (a generate would be refused: it is paused)."""
        while True:
            try:
                return paused.resume()
            except djinn.CapacityError:
                self._count("resume_retries")
                time.sleep(0.05)

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    # ---- native ------------------------------------------------------------------------
    def native_worker(self, wid: int) -> None:
        rng = random.Random(self.seed * 1000 + wid)
        k = 0
        while time.monotonic() < self.deadline:
            k += 1
            try:
                self._native_session(rng, check=(wid + k) % self.check_every == 0)
            except Exception as exc:   # noqa: BLE001 - recorded, the soak goes on
                self._error(f"native {wid}", exc)

    def _native_session(self, rng: random.Random, check: bool) -> None:
        c = djinn.connect(self.address, token=TOKEN)
        dropped = False
        try:
            s = c.model(self.model).session()
            self._count("sessions")
            history: list[int] = []
            for _ in range(rng.randint(1, 6)):
                if time.monotonic() > self.deadline:
                    break
                prompt = [rng.randrange(3, self.vocab) for _ in range(rng.randint(1, 12))]
                n = rng.randint(2, 10)
                what = rng.random()
                t = time.perf_counter()
                try:
                    if what < 0.15:
                        paused = s.generate(prompt, max_new_tokens=n, ignore_eos=True,
                                            breakpoint=(rng.randrange(2), rng.randrange(n)))
                        # from here the turn is the server's: a refusal of the resume is retried
                        out = self._resume(paused) if isinstance(paused, Paused) else paused
                        self._count("breakpoints")
                    elif what < 0.3:
                        out = s.generate(prompt, max_new_tokens=n, ignore_eos=True,
                                         interventions=[djinn.Scale(layer=rng.randrange(2), factor=1.0)])
                        self._count("interventions")
                    else:
                        out = s.generate(prompt, max_new_tokens=n, ignore_eos=True)
                except djinn.CapacityError:
                    self._count("capacity_refusals")
                    continue
                lat = time.perf_counter() - t
                with self.lock:
                    self.turns.append((time.monotonic(), lat))
                history += prompt
                if check:
                    ref = self._ref(history, n)
                    with self.lock:
                        self.checked["native_turns"] += 1
                    ev = self._judge(history, out.token_ids, ref)
                    if ev is not None:
                        print(f"soak: divergence ({'near-tie' if ev['near_tie'] else 'WRONG'}): {ev}", flush=True)
                        with self.lock:
                            (self.near_ties if ev["near_tie"] else self.wrong).append(ev)
                history += out.token_ids
                if rng.random() < 0.3:
                    s.signal_phase("IO_WAIT")
                    time.sleep(rng.uniform(0.0, 0.2))        # the client runs a tool meanwhile
                    s.signal_phase("ACTIVE")
                    self._count("phase_signals")
            if rng.random() < 0.25:
                dropped = True                               # gone without closing: the lease closes it
                self._count("disconnects")
                c._backend._sock.close()
            else:
                s.close()
                self._count("closes")
        finally:
            if not dropped:
                c.close()

    # ---- HTTP --------------------------------------------------------------------------
    def http_worker(self, wid: int) -> None:
        import httpx

        rng = random.Random(self.seed * 1000 + 500 + wid)
        h = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=self.http_url, headers=h, timeout=120) as http:
            k = 0
            while time.monotonic() < self.deadline:
                k += 1
                try:
                    self._http_conversation(http, rng, check=(wid + k) % self.check_every == 0, tag=f"{wid}-{k}")
                except Exception as exc:   # noqa: BLE001
                    self._error(f"http {wid}", exc)

    def _http_conversation(self, http, rng: random.Random, check: bool, tag: str) -> None:
        msgs: list[dict] = []
        answer = None
        sid = None
        for _ in range(rng.randint(1, 4)):
            if time.monotonic() > self.deadline:
                break
            msgs.append({"role": "user", "content": " ".join(rng.choice(["tea", "sky", "red", "go", "one"])
                                                            for _ in range(rng.randint(1, 5)))})
            r = http.post("/chat/completions", json={"model": self.model, "messages": msgs, "max_tokens": 6,
                                                     "temperature": 0, "prompt_cache_key": f"soak-{tag}"})
            if r.status_code == 429:
                self._count("capacity_refusals")
                msgs.pop()
                continue
            r.raise_for_status()
            answer = r.json()["choices"][0]["message"]["content"]
            sid = r.headers.get("x-djinn-session-id")
            msgs.append({"role": "assistant", "content": answer})
            with self.lock:
                self.http_turns += 1
        if check and answer is not None:
            fresh = http.post("/chat/completions", json={"model": self.model, "messages": msgs[:-1], "max_tokens": 6,
                                                         "temperature": 0, "prompt_cache_key": f"soak-ref-{tag}"})
            if fresh.status_code == 200:
                with self.lock:
                    self.checked["http_conversations"] += 1
                if fresh.json()["choices"][0]["message"]["content"] != answer:
                    with self.lock:
                        self.wrong.append({"http_conversation": tag, "cached": answer,
                                           "fresh": fresh.json()["choices"][0]["message"]["content"]})
                ref_sid = fresh.headers.get("x-djinn-session-id")
                if ref_sid:
                    http.delete(f"/sessions/{ref_sid}")
        if sid:
            http.delete(f"/sessions/{sid}")


def _held(client, model: str) -> dict:
    s = client.stats()
    return {"sessions": s["sessions"], "kv_device_blocks": s["kv_blocks"][model]["used"],
            "kv_parked": s["memory"]["kv_parked"], "tensors": s["memory"]["tensors"]}


def _thread_names(client) -> list[str]:
    return list(client.stats().get("server", {}).get("threads", []))


# The server's event loops (the native protocol's and the HTTP API's) run blocking calls in their
# default executors (``asyncio.to_thread``): thread pools that start a thread when a call finds
# none idle, up to ThreadPoolExecutor's default ``max_workers``, and never shrink. Their threads
# (``asyncio_N``) appear whenever calls first overlap that much, late in a run too: growth up to
# that bound is a pool filling, not a leak. The server runs on this host, so its CPU count is ours.
POOL_PREFIX = "asyncio_"
POOL_BOUND = 2 * min(32, (os.cpu_count() or 1) + 4)


def _threads_check(names0: list[str], names1: list[str], tasks0: int, tasks1: int) -> dict:
    """A thread leak is growth of anything but those bounded pools: threads with other names, or
    threads of the OS (tasks in /proc) that are not Python threads (torch's, sqlite's)."""
    fixed0 = collections.Counter(n for n in names0 if not n.startswith(POOL_PREFIX))
    fixed1 = collections.Counter(n for n in names1 if not n.startswith(POOL_PREFIX))
    pool1 = sum(1 for n in names1 if n.startswith(POOL_PREFIX))
    native0, native1 = tasks0 - len(names0), tasks1 - len(names1)
    return {"named_threads_new": sorted((fixed1 - fixed0).elements()), "pool_threads_end": pool1,
            "pool_bound": POOL_BOUND, "non_python_threads_start_end": [native0, native1],
            "ok": not (fixed1 - fixed0) and pool1 <= POOL_BOUND and native1 <= native0}


def run_soak(minutes: float, workers: int, http_workers: int, kv_blocks: int, seed: int, check_every: int,
             max_drift: float, device: str = "cpu", tie_tolerance: float | None = None, model: str = MODEL,
             ref_device: str = "cpu", dtype: str = "auto") -> dict:
    """One soak; ``model``/``dtype``: the server's (``djinn serve --model/--dtype``) and the
    reference's, which runs on ``ref_device`` in this process. ``tie_tolerance``: None
    calibrates it (``Soak.calibrate``, TIE_FACTOR x the measured rounding, at least TIE_TOLERANCE)."""
    import socket

    from djinn.server.launch import ServerProcess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    args = ["--kv-blocks", str(kv_blocks), "--lease", "1", "--policy", "semantic", "--dtype", dtype]
    if http_workers:
        args += ["--http-port", str(http_port)]
    srv = ServerProcess(*args, model=model, token=TOKEN, device=device, env={"OMP_NUM_THREADS": "1"}).start(600)
    try:
        watch = djinn.connect(srv.address, token=TOKEN)
        start = _held(watch, model)
        url = f"http://127.0.0.1:{http_port}/v1" if http_workers else None
        # warm-up: one turn each way, so lazily started threads exist before the baseline counts
        warm = watch.model(model).session()
        warm.generate([5, 6], max_new_tokens=2, ignore_eos=True)
        warm.close()
        if url:
            import httpx

            deadline = time.monotonic() + 300      # the HTTP front end starts after the models load
            while True:
                try:
                    httpx.get(url.removesuffix("/v1") + "/health", timeout=5)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or not srv.alive() or "HTTP API: not available" in srv.output:
                        raise RuntimeError("the server's HTTP front end did not come up; its output:\n"
                                           + srv.output[-4000:]) from None
                    time.sleep(0.5)
            # the first text turn starts the tokenizer's own thread pool (Rust, one thread per
            # CPU, not Python threads): it must exist before the baseline is counted
            h = {"Authorization": f"Bearer {TOKEN}"}
            r = httpx.post(url + "/chat/completions", headers=h, timeout=120,
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            r.raise_for_status()
            httpx.delete(url + f"/sessions/{r.headers['x-djinn-session-id']}", headers=h, timeout=30)
        soak = Soak(srv.address, url, seed, check_every, 0.0, TIE_TOLERANCE, model, ref_device, dtype)
        soak._ref([5, 6], 2)             # load the reference model now: not inside the first tenth's latencies
        rounding = soak.calibrate(watch)
        soak.tie_tolerance = tie_tolerance if tie_tolerance is not None else max(TIE_TOLERANCE, TIE_FACTOR * rounding)
        print(f"soak: server vs reference logits differ by up to {rounding:.3g}; near-tie tolerance "
              f"{soak.tie_tolerance:.3g}", flush=True)
        t0 = time.monotonic()
        soak.deadline = t0 + minutes * 60
        samples: list[tuple[float, int, int]] = []      # (s since start, threads, fds) of the server
        names0 = _thread_names(watch)
        tasks0 = _proc_counts(srv.proc.pid)[0]
        names: list[tuple[float, list[str]]] = [(0.0, names0)]   # the server's Python threads by name
        pool = [threading.Thread(target=soak.native_worker, args=(i,), daemon=True) for i in range(workers)]
        pool += [threading.Thread(target=soak.http_worker, args=(i,), daemon=True) for i in range(http_workers)]
        for th in pool:
            th.start()
        last = t0
        while any(th.is_alive() for th in pool):
            time.sleep(1.0)
            samples.append((time.monotonic() - t0, *_proc_counts(srv.proc.pid)))
            if len(samples) % 10 == 0:
                names.append((samples[-1][0], _thread_names(watch)))
            if time.monotonic() - last > 30:
                last = time.monotonic()
                print(f"soak: {last - t0:5.0f} s, {len(soak.turns)} native + {soak.http_turns} HTTP turns, "
                      f"{len(soak.wrong)} wrong, {len(soak.errors)} errors", flush=True)
        for th in pool:
            th.join(300)
        elapsed = time.monotonic() - t0
        mid = watch.stats()
        # everything closed or dropped: wait for the leases, then compare with the start
        deadline = time.monotonic() + 60
        end = _held(watch, model)
        while end != start and time.monotonic() < deadline:
            time.sleep(0.5)
            end = _held(watch, model)
        threads1, fds1 = _proc_counts(srv.proc.pid)
        names1 = _thread_names(watch)
        tasks1 = _proc_counts(srv.proc.pid)[0]
        threads = _threads_check(names0, names1, tasks0, tasks1)
        # file descriptors: sockets of pools that open on demand make single counts noisy; a leak
        # is growth: the count after everything closed may not exceed the most in the first half
        first_half = [x for x in samples if x[0] <= minutes * 30] or [(0.0, threads1, fds1)]
        threads0, fds0 = max(x[1] for x in first_half), max(x[2] for x in first_half)
        watch.close()
        turns = sorted(soak.turns)
        tenth = max(1, len(turns) // 10)
        p99_first = _p99([lat for _, lat in turns[:tenth]])
        p99_last = _p99([lat for _, lat in turns[-tenth:]])
        drift = p99_last / p99_first if p99_first else 0.0
        by_tenth = [_p99([lat for _, lat in turns[i * tenth:(i + 1) * tenth]]) * 1e3 for i in range(10)]
        checks = {
            "wrong_outputs_zero": not soak.wrong,
            "memory_back_to_start": end == start,
            "p99_drift_within_bound": drift <= max_drift,
            "threads_not_grown": threads["ok"],
            "fds_not_grown": fds1 <= fds0,
            "no_errors": not soak.errors,
            "outputs_checked": soak.checked["native_turns"] > 0,
        }
        return {
            "seconds": elapsed, "native_turns": len(turns), "http_turns": soak.http_turns, **soak.counts,
            "checked": soak.checked, "wrong_outputs": len(soak.wrong), "wrong_samples": soak.wrong[:10],
            "near_ties": len(soak.near_ties), "near_tie_samples": soak.near_ties[:10],
            "tie_tolerance": soak.tie_tolerance, "logits_rounding_measured": rounding,
            "errors": len(soak.errors), "error_samples": soak.errors[:10], "error_kinds": dict(soak.error_kinds),
            "held_start": start, "held_end": end,
            "swaps": mid.get("swaps"), "sessions_by_kv_location_at_end": mid.get("sessions_by_kv_location"),
            "p99_first_tenth_ms": p99_first * 1e3, "p99_last_tenth_ms": p99_last * 1e3, "p99_drift": drift,
            "p99_by_tenth_ms": by_tenth,
            "server_threads_first_half_max_and_end": [threads0, threads1],
            "server_fds_first_half_max_and_end": [fds0, fds1],
            "server_threads_max": max((x[1] for x in samples), default=threads1),
            "server_threads_check": threads,
            "server_thread_names_start": names0, "server_thread_names_end": names1,
            "server_threads_appeared": sorted((collections.Counter(names1) - collections.Counter(names0)).elements()),
            "server_thread_names_max": max(names, key=lambda x: len(x[1]))[1],
            "checks": checks, "passed": all(checks.values()),
        }
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    from djinn.bench.common import record, write

    p = argparse.ArgumentParser(prog="djinn bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=6, help="native-protocol client threads")
    p.add_argument("--http-workers", type=int, default=2, help="HTTP API client threads (0: none)")
    p.add_argument("--kv-blocks", type=int, default=24, help="device KV blocks: below what the sessions hold")
    p.add_argument("--check-every", type=int, default=3, help="compare one session in N with the reference")
    p.add_argument("--max-drift", type=float, default=1.2, help="allowed p99 ratio, last tenth / first tenth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-tolerance", type=float, default=None,
                   help="logit gap under which a divergence from the reference is a near-tie, counted apart "
                        f"(default: calibrated, {TIE_FACTOR:g}x the measured server/reference rounding, "
                        f"at least {TIE_TOLERANCE:g})")
    p.add_argument("--device", default="cpu", help="the server's device")
    p.add_argument("--model", default=MODEL, help="the preset served (and the reference's weights: the same seed)")
    p.add_argument("--dtype", default="auto", help="the server's and the reference's dtype (auto: float32 on the "
                                                    "CPU, float16 on a GPU)")
    p.add_argument("--ref-device", default="cpu", help="where this process runs the reference (transformers)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run_soak(a.minutes, a.workers, a.http_workers, a.kv_blocks, a.seed, a.check_every, a.max_drift, a.device,
                   a.tie_tolerance, a.model, a.ref_device, a.dtype)
    params = {k: v for k, v in vars(a).items() if k != "out"}
    write(record("soak", torch.device(a.device), params, res), a.out)
    print(f"soak: {res['native_turns']} native + {res['http_turns']} HTTP turns in {res['seconds']:.0f} s; "
          f"wrong {res['wrong_outputs']}; held {res['held_end']} (start {res['held_start']}); "
          f"p99 drift {res['p99_drift']:.2f}; checks {res['checks']}")
    print("soak: PASSED" if res["passed"] else "soak: FAILED")
    return 0 if res["passed"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
