"""Session ownership on a server without a token (the shared ``djinn_server``): a session
id alone does not let another client use the session; its own client, reconnecting, can."""

from __future__ import annotations

import pytest
import torch

import djinn
from djinn.client.remote import RemoteBackend
from tests.conftest import loaded
from tests.server.raw import Peer

MODEL = "tiny-llama"


def hf_greedy(history: list[int], n: int) -> list[int]:
    ids = torch.tensor([history])
    out = loaded(MODEL).model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
    return out[0, len(history):].tolist()


def test_another_client_cannot_use_a_session_by_its_id(djinn_server):
    owner = djinn.connect(djinn_server.address)
    thief = djinn.connect(djinn_server.address)
    try:
        s = owner.model(MODEL).session()
        first = s.generate([4, 5, 6], max_new_tokens=3, ignore_eos=True).token_ids
        logits = s.forward([7, 8]).logits
        p = owner.model(MODEL).session().forward([1, 2, 3], breakpoint=0)
        before = owner.stats()
        tb = thief._backend
        attempts = [
            lambda: thief.model(MODEL).session(s.id),
            lambda: tb.generate(s.id, djinn.engine.GenerateRequest([1])),
            lambda: tb.signal_phase(s.id, "IO_WAIT"),
            lambda: tb.session_info(s.id),
            lambda: tb.forward(s.id, [1]),
            lambda: tb.close_session(s.id),
            lambda: tb.fetch(logits.id),
            lambda: tb.release(logits.id),
            lambda: tb.resume(p.id),
        ]
        for attempt in attempts:
            with pytest.raises(djinn.SessionNotFound, match="not yours"):
                attempt()
        with Peer(djinn_server.host_port) as peer:          # a raw connection with no client key either
            assert peer.hello(None)["ok"]
            reply = peer.request("generate", session_id=s.id, prompt=[1])
            assert reply["error"]["code"] == "session_not_found"
        after = owner.stats()
        assert (after["sessions"], after["kv_blocks"], after["memory"]) == (
            before["sessions"], before["kv_blocks"], before["memory"])
        # the owner's session is untouched: it continues exactly where it was
        out = s.generate([9], max_new_tokens=3, ignore_eos=True)
        assert out.token_ids == hf_greedy([4, 5, 6] + first + [7, 8, 9], 3)
        assert torch.equal(logits.fetch(), logits.fetch()) and p.resume().logits.shape[0] == 3
    finally:
        thief.close()
        owner.close()


def test_the_same_client_key_takes_its_sessions_up_after_a_restart(djinn_server):
    first = RemoteBackend(djinn_server.address)
    sid = first.open_session(MODEL)
    first.close(keep_sessions=True)                     # e.g. the process restarts
    again = djinn.client.Client(RemoteBackend(djinn_server.address, client_key=first.client_key))
    try:
        s = again.model(MODEL).session(sid)
        assert s.generate([1, 2], max_new_tokens=2, ignore_eos=True).token_ids == hf_greedy([1, 2], 2)
    finally:
        again.close()
    stranger = djinn.connect(djinn_server.address)
    try:
        with pytest.raises(djinn.SessionNotFound):       # closed with its client now
            stranger.model(MODEL).session(sid)
    finally:
        stranger.close()


def test_closing_a_client_closes_its_sessions(djinn_server):
    watcher = djinn.connect(djinn_server.address)
    try:
        base = watcher.stats()["sessions"]
        c = djinn.connect(djinn_server.address)
        for _ in range(3):
            c.model(MODEL).session().generate([1, 2, 3], max_new_tokens=2, ignore_eos=True)
        assert watcher.stats()["sessions"] == base + 3
        c.close()
        assert watcher.stats()["sessions"] == base
        with pytest.raises(djinn.InvalidRequest, match="closed"):
            c.stats()
    finally:
        watcher.close()
