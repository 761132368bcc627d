"""Restart without loss (server/journal.py).

In-process: the journal round-trips a session through the engine hooks (only stable owners,
rows forgotten on close, a restored session's next turn equals an uninterrupted one).
End to end: a real ``djinn serve --journal`` killed with SIGKILL between turns continues the
session after a restart; the next turn's tokens equal transformers' greedy generate on the full
history (the oracle). Without ``--journal`` the old id is SessionNotFound.
"""

from __future__ import annotations

import signal

import pytest
import torch

import djinn
from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine
from djinn.engine.requests import GenerateRequest
from djinn.engine.sampling import SamplingParams
from djinn.server.journal import Journal, pack_tokens, unpack_tokens
from djinn.server.launch import ServerProcess
from tests.conftest import TEST_CHILD_ENV, loaded

MODEL = "tiny-llama"
TOKEN = "journal-token-" + "y" * 24


def hf_greedy(history: list[int], n: int) -> list[int]:
    model = loaded(MODEL).model
    ids = torch.tensor([history])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(history):].tolist()


def _req(prompt, n=4):
    return GenerateRequest(prompt=prompt, params=SamplingParams(max_new_tokens=n, ignore_eos=True))


def test_token_blobs_round_trip_as_int32():
    ids = [0, 1, 31999, 2**31 - 1]
    blob = pack_tokens(ids)
    assert len(blob) == 4 * len(ids) and unpack_tokens(blob) == ids


def test_the_engine_hooks_record_commits_forget_closes_and_restore(tmp_path):
    path = tmp_path / "j.sqlite"
    engine = Engine({MODEL: loaded(MODEL)}, EngineConfig(memory=MemoryConfig(kv_blocks=64)))
    j = Journal(path)
    j.attach(engine)
    try:
        kept = engine.open_session(MODEL, owner="token:abc")
        anon = engine.open_session(MODEL, owner="conn:3")      # dies with its connection: not journaled
        gone = engine.open_session(MODEL, owner="key:k")
        first = engine.generate(kept, _req([5, 6, 7]), owner="token:abc").token_ids
        engine.generate(anon, _req([5, 6, 7]), owner="conn:3")
        engine.generate(gone, _req([1, 2]), owner="key:k")
        engine.close_session(gone, owner="key:k")
        rows = {r["session_id"]: r for r in j.rows()}
        assert set(rows) == {kept}
        assert rows[kept]["tokens"] == [5, 6, 7] + first and rows[kept]["turns"] == 1
        assert rows[kept]["cached"] == len(rows[kept]["tokens"]) - 1   # the last sampled token has no KV yet
        j.detach(engine)
    finally:
        engine.shutdown()
        j.close()
    assert {r["session_id"] for r in Journal(path).rows()} == {kept}   # a shutdown does not empty it

    again = Engine({MODEL: loaded(MODEL)}, EngineConfig(memory=MemoryConfig(kv_blocks=64)))
    j2 = Journal(path)
    try:
        assert j2.restore(again) == [(kept, "token:abc")]
        assert again.session_info(kept, owner="token:abc")["kv_location"] == "dropped"
        with pytest.raises(djinn.SessionNotFound):
            again.session_info(kept, owner="token:other")     # still scoped by owner
        nxt = again.generate(kept, _req([9, 10]), owner="token:abc")
        assert nxt.token_ids == hf_greedy([5, 6, 7] + first + [9, 10], 4)
        assert nxt.cached_tokens == 0 and nxt.computed_tokens >= len(first) + 3   # the KV was recomputed
    finally:
        again.shutdown()
        j2.close()


def test_a_row_of_a_model_not_loaded_is_skipped_and_kept(tmp_path):
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    j._db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?)",
                  ("s1", "token:x", "no-such-model", pack_tokens([1, 2]), "[]", 0, 1, 1, 0.0))
    engine = Engine({MODEL: loaded(MODEL)}, EngineConfig(memory=MemoryConfig(kv_blocks=16)))
    try:
        assert j.restore(engine) == [] and j.counters["restore_skipped"] == 1
        assert engine.stats()["sessions"] == 0 and len(j.rows()) == 1
    finally:
        engine.shutdown()
        j.close()


def _server(*extra) -> ServerProcess:
    return ServerProcess("--kv-blocks", "128", *extra, token=TOKEN, env=TEST_CHILD_ENV).start()


def test_sigkill_between_turns_then_restart_continues_the_session(tmp_path):
    journal = str(tmp_path / "journal.sqlite")
    srv = _server("--journal", journal)
    try:
        c = djinn.connect(srv.address, token=TOKEN)
        s = c.model(MODEL).session()
        sid = s.id
        t1 = s.generate([11, 12, 13], max_new_tokens=5, ignore_eos=True).token_ids
        t2 = s.generate([14, 15], max_new_tokens=5, ignore_eos=True).token_ids
        history = [11, 12, 13] + t1 + [14, 15] + t2
    finally:
        srv.stop(signal.SIGKILL)                     # a crash: no shutdown code runs
    assert srv.proc.returncode == -signal.SIGKILL

    srv = _server("--journal", journal)
    try:
        assert "1 session(s) restored" in srv.output
        c = djinn.connect(srv.address, token=TOKEN)
        s = c.model(MODEL).session(sid)
        assert s.info()["tokens"] == len(history)
        out = s.generate([16, 17], max_new_tokens=6, ignore_eos=True).token_ids
        assert out == hf_greedy(history + [16, 17], 6)
        c.close()
    finally:
        srv.stop()

    srv = _server()                                  # no journal: the old id is unknown
    try:
        c = djinn.connect(srv.address, token=TOKEN)
        with pytest.raises(djinn.SessionNotFound):
            c.model(MODEL).session(sid)
        c.close()
    finally:
        srv.stop()
