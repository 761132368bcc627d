"""Overload (server/admission.py): a burst of ten times what the server admits gets
CapacityError at once for the excess, the admitted turns complete with the right tokens
(transformers' greedy generate as the oracle) and within a bound of their unloaded latency,
the queue never exceeds its limit; sessions per key and tokens per request are enforced; the
HTTP API's 429s carry Retry-After."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import djinn
from djinn.server.launch import ServerProcess
from tests.conftest import TEST_CHILD_ENV, loaded

MODEL = "tiny-llama"
MAX_QUEUED = 2
BURST = 10 * (MAX_QUEUED + 1)      # ten times what the server takes at once (one running + the queue)
N = 24


def hf_greedy(history: list[int], n: int) -> list[int]:
    model = loaded(MODEL).model
    ids = torch.tensor([history])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(history):].tolist()


@pytest.fixture(scope="module")
def srv():
    # no token: each client is its own principal (its client key), so per-key limits are per client
    # a generate leaves the queue when it starts (into the batch): --max-running bounds the batch
    # too, so the server takes MAX_QUEUED + 1 turns at once whatever the timing
    s = ServerProcess("--kv-blocks", "512", "--lease", "1", "--max-queued", str(MAX_QUEUED),
                      "--max-running", str(MAX_QUEUED + 1), "--max-sessions-per-key", "3", "--max-tokens-per-request", "64", env=TEST_CHILD_ENV).start()
    yield s
    s.stop()


def test_a_burst_of_ten_times_capacity_is_refused_fast_and_the_admitted_turns_are_right(srv):
    clients = [djinn.connect(srv.address) for _ in range(BURST)]
    try:
        sessions = [c.model(MODEL).session() for c in clients]
        prompts = [[3 + i % 7, 5, 8 + i % 5] for i in range(BURST)]
        alone = []
        for _ in range(3):                      # the unloaded latency of one such turn
            t = time.perf_counter()
            sessions[0].generate(prompts[0], max_new_tokens=N, ignore_eos=True)
            alone.append(time.perf_counter() - t)
        sessions[0] = clients[0].model(MODEL).session()   # fresh history for the burst
        results: list = [None] * BURST
        gate = threading.Barrier(BURST)

        def one(i: int) -> None:
            gate.wait()
            t = time.perf_counter()
            try:
                out = sessions[i].generate(prompts[i], max_new_tokens=N, ignore_eos=True).token_ids
                results[i] = ("ok", time.perf_counter() - t, out)
            except djinn.CapacityError as exc:
                results[i] = ("refused", time.perf_counter() - t, str(exc))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        admitted = [i for i, r in enumerate(results) if r[0] == "ok"]
        refused = [i for i, r in enumerate(results) if r[0] == "refused"]
        assert len(admitted) + len(refused) == BURST
        assert len(admitted) >= MAX_QUEUED + 1 and len(refused) >= BURST // 2
        assert "retry after" in results[refused[0]][2]
        assert max(results[i][1] for i in refused) < 2.0                   # refused at once, not after waiting
        for i in admitted:
            assert results[i][2] == hf_greedy(prompts[i], N)
        # an admitted turn waited for at most the running one and the queue ahead of it
        bound = (MAX_QUEUED + 1) * max(alone) * 1.5 + 1.0
        assert max(results[i][1] for i in admitted) < bound
        adm = clients[0].stats()["server"]["admission"]
        assert adm["queued_high_water"] <= MAX_QUEUED and adm["queued"] == 0
        assert adm["running_high_water"] <= MAX_QUEUED + 1
        assert adm["rejected"]["queue"] + adm["rejected"]["running"] >= len(refused)
        # and afterwards every client is served again
        for i in refused[:3]:
            assert sessions[i].generate(prompts[i], max_new_tokens=4, ignore_eos=True).token_ids == \
                hf_greedy(prompts[i], 4)
    finally:
        for c in clients:
            c.close()


def test_sessions_per_key_and_tokens_per_request_are_enforced(srv):
    c = djinn.connect(srv.address)
    try:
        m = c.model(MODEL)
        opened = [m.session() for _ in range(3)]
        with pytest.raises(djinn.CapacityError, match="max-sessions-per-key"):
            m.session()
        other = djinn.connect(srv.address)                 # another key has its own allowance
        other.model(MODEL).session()
        other.close()
        opened[0].close()
        fresh = m.session()                                 # a place freed
        with pytest.raises(djinn.InvalidRequest, match="max-tokens-per-request"):
            fresh.generate(list(range(10, 30)), max_new_tokens=50)
        assert fresh.info()["tokens"] == 0                  # nothing changed
        assert fresh.generate(list(range(10, 30)), max_new_tokens=4, ignore_eos=True).token_ids == \
            hf_greedy(list(range(10, 30)), 4)
    finally:
        c.close()


def test_http_429_carries_retry_after():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from djinn.config import EngineConfig, MemoryConfig
    from djinn.engine import Engine
    from djinn.server.http import HttpConfig, create_app

    engine = Engine({MODEL: loaded(MODEL)}, EngineConfig(memory=MemoryConfig(kv_blocks=32)))
    try:
        with TestClient(create_app(engine, HttpConfig(max_waiting=0))) as client:
            r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k"},
                            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        engine.shutdown()


def test_running_generations_are_bounded_not_only_the_queue():
    """Starting a generate only hands it to the batcher, so the queue bound alone admits any
    number of turns into the batch: --max-running bounds the generates admitted and unfinished."""
    limit, burst, n = 2, 12, 48
    s = ServerProcess("--kv-blocks", "512", "--lease", "1", "--max-queued", "256", "--max-running", str(limit),
                      env=TEST_CHILD_ENV).start()
    clients = [djinn.connect(s.address) for _ in range(burst)]
    try:
        sessions = [c.model(MODEL).session() for c in clients]
        results: list = [None] * burst
        gate = threading.Barrier(burst)

        def one(i: int) -> None:
            gate.wait()
            try:
                results[i] = ("ok", sessions[i].generate([3 + i, 5, 8], max_new_tokens=n, ignore_eos=True).token_ids)
            except djinn.CapacityError as exc:
                results[i] = ("refused", str(exc))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(burst)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        admitted = [i for i, r in enumerate(results) if r[0] == "ok"]
        refused = [r[1] for r in results if r[0] == "refused"]
        adm = clients[0].stats()["server"]["admission"]
        assert adm["running_high_water"] <= limit and adm["running"] == 0 and adm["queued"] == 0
        assert refused and all("generations are running" in r for r in refused)
        assert adm["rejected"]["running"] == len(refused) and len(admitted) >= 1
        for i in admitted[:2]:
            assert results[i][1] == hf_greedy([3 + i, 5, 8], n)
    finally:
        for c in clients:
            c.close()
        s.stop()
