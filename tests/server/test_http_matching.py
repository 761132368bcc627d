"""Which session a request lands in: header, previous_response_id, tool-call ids, common prefix;
sessions never cross between conversations or API keys, and diverging history is never reused."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import HTTP_DEPS, require

require(*HTTP_DEPS, "openai")

import openai  # noqa: E402

from tests.server.http_helpers import KEY, OTHER_KEY, SYSTEM, assistant_message  # noqa: E402

MODEL = "smollm2-135m"


def ask(client, msgs, n=6, **kw):
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=n, **kw)
    return r, r.model_extra["djinn"]


def test_common_prefix_continues_the_session_without_any_header(server):
    c = server.client()
    msgs = [SYSTEM, {"role": "user", "content": "Say hello to Ada."}]
    r1, d1 = ask(c, msgs)
    msgs += [assistant_message(r1.choices[0].message), {"role": "user", "content": "And to Bob?"}]
    r2, d2 = ask(c, msgs)
    assert d2["session_id"] == d1["session_id"] and d2["matched_by"] == "prefix"
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert d2["computed_tokens"] == (r2.usage.prompt_tokens - r2.usage.prompt_tokens_details.cached_tokens
                                     + r2.usage.completion_tokens - 1)


def test_header_names_the_session(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Count: one, two"}]
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, temperature=0, max_tokens=4)
    sid = raw.headers["x-djinn-session-id"]
    r1 = raw.parse()
    assert r1.model_extra["djinn"]["session_id"] == sid
    msgs += [assistant_message(r1.choices[0].message), {"role": "user", "content": "Go on."}]
    r2, d2 = ask(c, msgs, extra_headers={"X-Djinn-Session": sid})
    assert d2["session_id"] == sid and d2["matched_by"] == "header"
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    # the body field works the same way; a session of nobody is a 404
    r3, d3 = ask(c, msgs, extra_body={"djinn_session": sid})
    assert d3["session_id"] == sid
    with pytest.raises(openai.NotFoundError):
        ask(c, msgs, extra_headers={"X-Djinn-Session": "f" * 32})


def test_two_sessions_with_the_same_system_prompt_never_cross(server):
    c = server.client()
    a = [SYSTEM, {"role": "user", "content": "My name is Ada. Greet me."}]
    b = [SYSTEM, {"role": "user", "content": "My name is Bob. Greet me."}]
    ra, da = ask(c, a)
    rb, db = ask(c, b)
    assert da["session_id"] != db["session_id"]
    # a new session: only full KV blocks of what the two prompts have in common (the system prompt
    # and the user turn up to the name) may be reused, through prefix sharing
    probe, _ = ask(c, [SYSTEM, {"role": "user", "content": "My name is"}], n=1)
    cached = rb.usage.prompt_tokens_details.cached_tokens
    assert db["matched_by"] == "new" and cached % 16 == 0 and cached < probe.usage.prompt_tokens
    a += [assistant_message(ra.choices[0].message), {"role": "user", "content": "What is my name?"}]
    b += [assistant_message(rb.choices[0].message), {"role": "user", "content": "What is my name?"}]
    ra2, da2 = ask(c, a)
    rb2, db2 = ask(c, b)
    assert da2["session_id"] == da["session_id"] and db2["session_id"] == db["session_id"]
    # the same conversation under another key starts from nothing
    alone = server.client(OTHER_KEY)
    rb3, db3 = ask(alone, b)
    assert db3["matched_by"] == "new" and rb3.usage.prompt_tokens_details.cached_tokens == 0
    assert rb3.choices[0].message.content == rb2.choices[0].message.content


def test_an_edited_earlier_message_never_reuses_mismatched_kv(server):
    c = server.client()
    msgs = [SYSTEM, {"role": "user", "content": "Remember the number 41."}]
    r1, d1 = ask(c, msgs)
    msgs += [assistant_message(r1.choices[0].message), {"role": "user", "content": "Add one to it."}]
    r2, d2 = ask(c, msgs)
    assert d2["session_id"] == d1["session_id"]
    edited = [dict(m) for m in msgs]
    edited[1]["content"] = "Remember the number 97."
    r3, d3 = ask(c, edited)
    assert d3["session_id"] != d1["session_id"]
    # whatever is reused lies before the edit: the system prompt and the user turn's header at most
    sys_only = c.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": "x"}],
                                         temperature=0, max_tokens=1, extra_headers={"X-Djinn-Session": d3["session_id"]})
    assert r3.usage.prompt_tokens_details.cached_tokens < sys_only.usage.prompt_tokens
    # a fresh conversation under the other key gives the same reply to the edited one
    r4, _ = ask(server.client(OTHER_KEY), edited)
    assert r4.choices[0].message.content == r3.choices[0].message.content
    # the original session is intact and still continues from its KV
    msgs += [assistant_message(r2.choices[0].message), {"role": "user", "content": "Thanks."}]
    r5, d5 = ask(c, msgs)
    assert d5["session_id"] == d1["session_id"]
    assert r5.usage.prompt_tokens_details.cached_tokens >= r2.usage.prompt_tokens + r2.usage.completion_tokens - 1


def test_two_api_keys_never_share_a_session(server):
    one, two = server.client(KEY), server.client(OTHER_KEY)
    msgs = [{"role": "user", "content": "Tell me a secret word."}]
    r1, d1 = ask(one, msgs)
    msgs2 = msgs + [assistant_message(r1.choices[0].message), {"role": "user", "content": "Again."}]
    r2, d2 = ask(two, msgs2)
    assert d2["session_id"] != d1["session_id"] and r2.usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(openai.NotFoundError):
        ask(two, msgs2, extra_headers={"X-Djinn-Session": d1["session_id"]})
    assert server.get(f"/v1/sessions/{d1['session_id']}", OTHER_KEY).status_code == 404
    assert d1["session_id"] not in {s["id"] for s in server.get("/v1/sessions", OTHER_KEY).json()["data"]}
    assert d1["session_id"] in {s["id"] for s in server.get("/v1/sessions", KEY).json()["data"]}


def test_previous_response_id_continues_a_stored_response(server):
    c = server.client()
    r1 = c.responses.create(model=MODEL, input="Say the word apple.", instructions="Be brief.", temperature=0,
                            max_output_tokens=5)
    assert r1.store is True and r1.usage.input_tokens_details.cached_tokens == 0
    d1 = r1.model_extra["djinn"]
    r2 = c.responses.create(model=MODEL, input="Now say pear.", instructions="Be brief.", temperature=0,
                            max_output_tokens=5, previous_response_id=r1.id)
    d2 = r2.model_extra["djinn"]
    assert d2["session_id"] == d1["session_id"] and d2["matched_by"] == "previous_response_id"
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens + r1.usage.output_tokens - 1
    got = c.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output_text == r1.output_text
    # a response that was not stored cannot be continued or read; ignored fields are refused
    r3 = c.responses.create(model=MODEL, input="Hi", temperature=0, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r3.id)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model=MODEL, input="Hi", max_output_tokens=2, reasoning={"effort": "high"})
    assert "reasoning" in str(err.value)
    c.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r1.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=MODEL, input="x", max_output_tokens=2, previous_response_id=r1.id)
    # another key cannot see the stored response
    with pytest.raises(openai.NotFoundError):
        server.client(OTHER_KEY).responses.retrieve(r2.id)


def test_responses_tool_loop_by_call_id(server):
    c = server.client()
    tool = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    r1 = c.responses.create(model=MODEL, input="Weather in Oslo?", tools=[tool], temperature=0, max_output_tokens=40,
                            tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [o for o in r1.output if o.type == "function_call"]
    sid = r1.model_extra["djinn"]["session_id"]
    assert server.session(sid)["phase"] == "IO_WAIT"
    r2 = c.responses.create(model=MODEL, previous_response_id=r1.id, tools=[tool], temperature=0,
                            max_output_tokens=6, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                         "output": "cold, 2 C"}])
    assert r2.model_extra["djinn"]["session_id"] == sid
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens + r1.usage.output_tokens - 1
    assert server.session(sid)["phase"] == "ACTIVE"


def test_a_diverging_conversation_forks_the_one_it_repeats(server):
    """Fork-on-divergence: an edit late in a long conversation (or a sub-agent handed its
    parent's history) becomes a fork of the original cut back to where they differ; its reply is
    the one a fresh conversation under another key gets, and the original goes on untouched."""
    c = server.client()
    msgs = [SYSTEM, {"role": "user", "content": "Remember these: apple, river, candle, seven, violet, north."}]
    r1, d1 = ask(c, msgs)
    msgs += [assistant_message(r1.choices[0].message), {"role": "user", "content": "Which was the fruit?"}]
    r2, d2 = ask(c, msgs)
    assert d2["session_id"] == d1["session_id"]
    edited = [dict(m) for m in msgs]
    edited[-1]["content"] = "Which was the colour?"
    r3, d3 = ask(c, edited)
    assert d3["matched_by"] == "fork" and d3["session_id"] != d1["session_id"]
    shared = d3["diverged_overlap"]
    # the fork holds the shared history's KV: only the tokens after the edit are computed
    assert r3.usage.prompt_tokens_details.cached_tokens == shared < r3.usage.prompt_tokens
    r4, _ = ask(server.client(OTHER_KEY), edited)
    assert r4.choices[0].message.content == r3.choices[0].message.content
    # the original keeps its own history and KV
    msgs += [assistant_message(r2.choices[0].message), {"role": "user", "content": "Thanks."}]
    r5, d5 = ask(c, msgs)
    assert d5["session_id"] == d1["session_id"] and d5["matched_by"] == "prefix"
    assert r5.usage.prompt_tokens_details.cached_tokens >= r2.usage.prompt_tokens + r2.usage.completion_tokens - 1
