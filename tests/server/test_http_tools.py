"""The agent tool loop through the official ``openai`` client against a real server process."""

from __future__ import annotations

import json

import pytest

from tests.conftest import HTTP_DEPS, require

require(*HTTP_DEPS, "openai")

from tests.server.http_helpers import SYSTEM, TIME, WEATHER, assistant_message, smollm2_server  # noqa: E402

MODEL = "smollm2-135m"
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_tool_loop_keeps_the_session_across_the_tool_call(server):
    client = server.client()
    msgs = [SYSTEM, {"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, TIME], tool_choice=NAMED,
                                           temperature=0, max_tokens=40)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict) and isinstance(args["city"], str)
    # a new conversation: at most full KV blocks of a system prompt and tool list that another
    # session of this key holds are reused (prefix sharing)
    first_cached = first.usage.prompt_tokens_details.cached_tokens
    assert first_cached % 16 == 0 and first_cached < first.usage.prompt_tokens
    djinn = first.model_extra["djinn"]
    sid = djinn["session_id"]

    info = server.session(sid)
    assert info["phase"] == "IO_WAIT"
    assert info["pending_tool_calls"] == [call.id]
    # --policy semantic, nothing known yet about this session's tool time and the device pool far
    # from full: its KV stays on the device as the first to go (standby), and nothing is copied
    assert info["kv_location"] == "device"

    msgs2 = msgs + [assistant_message(choice.message),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    second = client.chat.completions.create(model=MODEL, messages=msgs2, tools=[WEATHER, TIME], temperature=0,
                                            max_tokens=12)
    d2 = second.model_extra["djinn"]
    assert d2["session_id"] == sid and d2["matched_by"] == "tool_call_ids"
    p1, c1 = first.usage.prompt_tokens, first.usage.completion_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= p1 + c1 - 1
    # only the new tokens went through the model: the prompt past the cache, then one per decode step
    assert d2["computed_tokens"] == second.usage.prompt_tokens - cached + second.usage.completion_tokens - 1
    assert server.session(sid)["phase"] == "ACTIVE"

    fresh = smollm2_server()
    try:
        again = fresh.client().chat.completions.create(model=MODEL, messages=msgs2, tools=[WEATHER, TIME],
                                                       temperature=0, max_tokens=12)
    finally:
        fresh.stop()
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens == second.usage.prompt_tokens
    assert again.choices[0].message.content == second.choices[0].message.content
    assert again.choices[0].finish_reason == second.choices[0].finish_reason
    assert [(c.function.name, c.function.arguments) for c in again.choices[0].message.tool_calls or []] == \
        [(c.function.name, c.function.arguments) for c in second.choices[0].message.tool_calls or []]


def _streamed(client, **kw):
    text, calls, finish, usage, djinn = "", {}, None, None, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if not ch.choices:
            usage = ch.usage
            continue
        delta = ch.choices[0].delta
        text += delta.content or ""
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            if tc.function:
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
        if ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
            djinn = (ch.model_extra or {}).get("djinn")
    return text, [calls[i] for i in sorted(calls)], finish, usage, djinn


@pytest.mark.parametrize("tool_choice", ["required", NAMED, "auto"])
def test_streaming_and_not_give_the_same_text_and_tool_calls(server, tool_choice):
    client = server.client()
    kw = dict(model=MODEL, messages=[SYSTEM, {"role": "user", "content": "Weather in Rome, please."}],
              tools=[WEATHER, TIME], tool_choice=tool_choice, temperature=0, max_tokens=64)  # calls end by 62
    whole = client.chat.completions.create(**kw)
    text, calls, finish, usage, djinn = _streamed(client, **kw)
    msg = whole.choices[0].message
    assert finish == whole.choices[0].finish_reason
    assert text == (msg.content or "")
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    assert all(c["id"] and c["id"].startswith("call_") for c in calls)
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    # a new conversation, whose prompt the first request's session holds: every full block of the
    # prompt but the one with its last token is shared (prefix sharing), nothing else is reused
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16
    assert djinn["session_id"] != whole.model_extra["djinn"]["session_id"]
    if tool_choice != "auto":
        assert finish == "tool_calls" and calls


def test_a_parallel_call_cut_by_max_tokens_ends_with_length(server):
    """Regression: SmolLM2 writes get_weather, then starts get_time when max_tokens (36) cuts it:
    the reply was finish_reason "tool_calls" with the cut call's raw markup as its content (the
    Agents SDK showed it as a stray assistant message). Now: "length", no content, the complete
    call only, streamed or not."""
    client = server.client()
    kw = dict(model=MODEL, messages=[SYSTEM, {"role": "user", "content": "Weather in Rome, please."}],
              tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=True, temperature=0, max_tokens=36)
    whole = client.chat.completions.create(**kw)
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 36
    assert msg.content is None
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == [("get_weather", '{"city": "Rome"}')]
    text, calls, finish, _, _ = _streamed(client, **kw)
    assert (text, finish) == ("", "length")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Rome"}')]

def test_streamed_plain_text_equals_non_streamed(server):
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], temperature=0,
              max_tokens=10, stop=["4."])
    whole = client.chat.completions.create(**kw)
    text, calls, finish, usage, _ = _streamed(client, **kw)
    assert text == whole.choices[0].message.content and not calls
    assert finish == whole.choices[0].finish_reason
