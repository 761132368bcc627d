"""Restart without loss, Responses API: stored responses are journaled (server/journal.py
``responses`` rows). The journal methods in isolation, then a real ``djinn serve --journal``
killed with SIGKILL: after the restart ``GET`` returns the same object, only to its own key,
``previous_response_id`` continues the journaled session with the answer an uninterrupted
server gave the same chain (run before the kill, in another namespace: greedy, no shared
state), ``DELETE`` removes it from the journal, and ``store: false`` was never written.
"""

from __future__ import annotations

import logging
import signal
from types import SimpleNamespace

import httpx

from djinn.server.journal import Journal
from tests.reliab.test_journal_http import MODEL, _http, _port, _server


def _session(sid: str, owner: str) -> SimpleNamespace:
    """What ``Journal.commit`` reads of an engine session."""
    return SimpleNamespace(id=sid, owner=owner, model=MODEL, tokens=[1, 2, 3], messages=[], ended_with_eos=True,
                           turns=1, num_cached=2, rebuild_to=0)


def test_response_rows_live_with_their_session(tmp_path, caplog):
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    j.commit(_session("s1", "http:a"))
    j.commit(_session("s2", "http:b"))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    j.note_response("resp_1", "http:a", "s1", msgs, {"id": "resp_1", "usage": {"total_tokens": 7}})
    j.note_response("resp_2", "http:a", "s1", msgs, {"id": "resp_2"})
    j.note_response("resp_3", "http:b", "s2", msgs, {"id": "resp_3"})
    j.note_response("resp_x", "http:a", "s9", msgs, {"id": "resp_x"})     # no such session row
    j.note_response("resp_y", "http:b", "s1", msgs, {"id": "resp_y"})     # another owner's session
    j.note_response("resp_z", "conn:3", "s1", msgs, {"id": "resp_z"})     # not a stable owner
    rows = j.responses()
    assert [r["id"] for r in rows] == ["resp_1", "resp_2", "resp_3"]
    assert rows[0] == {"id": "resp_1", "owner": "http:a", "session_id": "s1", "messages": msgs,
                       "obj": {"id": "resp_1", "usage": {"total_tokens": 7}}}
    j.forget_response("resp_1")
    j.forget("s1")                                   # its session closed: its responses go too
    assert [r["id"] for r in j.responses()] == ["resp_3"] and j.counters["errors"] == 0
    j.close()
    j = Journal(path)                                # on disk
    assert [(r["id"], r["session_id"]) for r in j.responses()] == [("resp_3", "s2")]
    j._db.execute("PRAGMA query_only = ON")          # every write now fails
    with caplog.at_level(logging.ERROR, logger="djinn.server"):
        j.note_response("resp_4", "http:b", "s2", msgs, {"id": "resp_4"})
        j.forget_response("resp_3")
    assert j.counters["errors"] == 2 and "could not record response resp_4" in caplog.text
    assert [r["id"] for r in j.responses()] == ["resp_3"]
    j.close()


KEY, OTHER = "responses-key-one", "responses-key-two"


def _respond(http: httpx.Client, text: str, prev: str | None = None, **extra) -> tuple[dict, str]:
    body = {"model": MODEL, "input": text, "max_output_tokens": 6, "temperature": 0, **extra}
    if prev is not None:
        body["previous_response_id"] = prev
    r = http.post("/responses", json=body)
    assert r.status_code == 200, r.text
    return r.json(), r.headers["x-djinn-session-id"]


def _answer(obj: dict) -> tuple:
    """What the model said (item ids are fresh on every run) and how many tokens."""
    said = [(i["type"], i["content"][0]["text"] if i["type"] == "message" else i["arguments"]) for i in obj["output"]]
    return said, obj["usage"]["input_tokens"], obj["usage"]["output_tokens"]


def _not_found(r: httpx.Response) -> bool:
    return r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


def test_stored_responses_survive_sigkill_and_restart(tmp_path):
    journal = str(tmp_path / "journal.sqlite")
    turns = ["tea sky red", "go one", "red red"]
    port = _port()
    srv = _server(journal, port, token=None)          # any key: two keys, two owners
    try:
        with _http(port, KEY) as http:
            r1, sid = _respond(http, turns[0])
            r2, sid2 = _respond(http, turns[1], prev=r1["id"])
            assert sid2 == sid and r2["djinn"]["matched_by"] == "previous_response_id"
            # the uninterrupted run of the whole chain, in another namespace
            oracle, osid = [], None
            for t in turns:
                o, osid = _respond(http, t, prev=oracle[-1]["id"] if oracle else None, prompt_cache_key="elsewhere")
                oracle.append(o)
            assert osid != sid and [_answer(o) for o in oracle[:2]] == [_answer(r1), _answer(r2)]
            unstored, _ = _respond(http, "not kept", store=False)
    finally:
        srv.stop(signal.SIGKILL)
    rows = Journal(journal)
    assert {r["id"] for r in rows.responses()} == {r1["id"], r2["id"]} | {o["id"] for o in oracle}
    rows.close()

    port = _port()
    srv = _server(journal, port, token=None)
    try:
        with _http(port, KEY) as http, _http(port, OTHER) as other:
            assert http.get(f"/responses/{r2['id']}").json() == r2
            assert _not_found(other.get(f"/responses/{r2['id']}"))          # still scoped by key
            assert _not_found(other.post("/responses", json={"model": MODEL, "input": "x",
                                                             "previous_response_id": r2["id"]}))
            assert _not_found(http.get(f"/responses/{unstored['id']}"))
            r3, sid3 = _respond(http, turns[2], prev=r2["id"])
            assert sid3 == sid and r3["djinn"]["matched_by"] == "previous_response_id"
            # the KV was not journaled: all of it recomputed on this first use
            assert r3["usage"]["input_tokens_details"]["cached_tokens"] == 0 and "recompute_ms" in r3["djinn"]["timings"]
            assert _answer(r3) == _answer(oracle[2])
            for r in (r1, r2):
                assert http.delete(f"/responses/{r['id']}").status_code == 200
                assert _not_found(http.get(f"/responses/{r['id']}"))
            assert http.get(f"/sessions/{sid}").status_code == 200                # r3 still on it
            assert http.delete(f"/responses/{r3['id']}").status_code == 200     # the last: session closes
            assert http.get(f"/sessions/{sid}").status_code == 404
    finally:
        srv.stop(signal.SIGKILL)
    rows = Journal(journal)
    assert {r["id"] for r in rows.responses()} == {o["id"] for o in oracle}
    assert sid not in {r["session_id"] for r in rows.rows()}
    rows.close()
