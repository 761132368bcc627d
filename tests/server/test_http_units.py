"""Pieces of the HTTP front end without a server: parsing, streaming splits, validation, rendering."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import HTTP_DEPS, require

require(*HTTP_DEPS)

from djinn.errors import CapacityError, Cancelled, SessionNotFound  # noqa: E402
from djinn.server.http import validate  # noqa: E402
from djinn.server.http.errors import APIError, from_djinn  # noqa: E402
from djinn.server.http.render import Renderer, call_text  # noqa: E402
from djinn.server.http.toolcalls import Splitter, parse  # noqa: E402

NAMES = {"get_weather", "get_time"}


def test_parse_hermes_blocks_and_bare_json():
    text = 'Let me check.\n' + call_text("get_weather", '{"city": "Paris"}') + "\n" + \
        call_text("get_time", '{"city":"Rome"}')
    content, calls = parse(text, NAMES, "auto")
    assert content == "Let me check."
    assert calls == [("get_weather", '{"city": "Paris"}'), ("get_time", '{"city": "Rome"}')]
    assert parse('{"name": "get_time", "parameters": {"city": "Oslo"}}', NAMES, "auto") == \
        (None, [("get_time", '{"city": "Oslo"}')])
    # unknown tools, broken JSON and tool_choice none stay text
    for text in ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>"]:
        assert parse(text, NAMES, "auto") == (text, [])
    assert parse(call_text("get_time", "{}"), NAMES, "none")[1] == []


@settings(max_examples=150, deadline=None)
@given(prefix=st.text(alphabet=st.sampled_from(list("ab <{}\n_\"tool")), max_size=12),
       calls=st.lists(st.sampled_from(["get_weather", "get_time", "rm"]), max_size=2),
       suffix=st.text(alphabet=st.sampled_from(list("xy \n<")), max_size=6),
       choice=st.sampled_from(["auto", "none", "required"]), stop=st.sampled_from([[], ["ab"], ["tool_c"]]),
       cut=st.one_of(st.none(), st.integers(0, 200)))
def test_streamed_content_is_always_a_prefix_of_the_final_content(prefix, calls, suffix, choice, stop, cut):
    text = prefix + "".join(call_text(n, '{"city": "x"}') for n in calls) + suffix
    if cut is not None:                  # max_tokens ended the reply here
        text = text[:cut]
    content, _ = parse(text, NAMES, choice, truncated=cut is not None)
    sp = Splitter(NAMES, choice, stop)
    sent = ""
    for i in range(len(text) + 1):
        sent += sp.safe(text[:i])
    assert (content or "").startswith(sent)
    assert sent + sp.rest(content) == (content or "")


def test_a_call_cut_by_max_tokens_is_neither_a_call_nor_content():
    """Regression: a reply cut inside a tool call kept the raw markup as content (and, after
    complete parallel calls, was reported as "tool_calls"; turns.py now says "length")."""
    done = call_text("get_weather", '{"city": "Paris"}')
    cut = call_text("get_time", '{"city": "Rome"}')[:30]
    assert parse("Sure.\n" + cut, NAMES, "auto", truncated=True) == ("Sure.", [])
    assert parse(done + "\n" + cut, NAMES, "required", truncated=True) == (None, [("get_weather", '{"city": "Paris"}')])
    assert parse("Let me see. <tool_", NAMES, "auto", truncated=True) == ("Let me see.", [])
    assert parse('{"name": "get_weather", "argu', NAMES, "required", truncated=True) == (None, [])
    assert parse("cut mid-sentence", NAMES, "auto", truncated=True) == ("cut mid-sentence", [])
    assert parse("Sure.\n" + cut, NAMES, "auto")[0] == "Sure.\n" + cut   # a finished reply keeps it as text

def _engine_stream(pieces: list[str], stop: list[str]) -> tuple[list[str], str]:
    """What the engine does with stop strings: each token's text is streamed (``on_token``)
    before the stop check, and the reply is cut at the first stop string. Returns the texts
    the stream sees and the reply's text."""
    seen, text = [], ""
    for piece in pieces:
        text += piece
        seen.append(text)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return seen, text[:min(hits)]
    return seen, text


def test_a_stream_never_sends_a_stop_string_or_its_start():
    """Regression: with stop ["world"], tokens "Hello", " wor", "ld!" streamed "Hello wo" (the
    token that completes the stop string was let through less the stop's length - 1)."""
    seen, final = _engine_stream(["Hello", " wor", "ld!"], ["world"])
    sp = Splitter(set(), "none", ["world"])
    sent = "".join(sp.safe(t) for t in seen)
    assert sent == "Hello " == final
    assert sent + sp.rest(final) == final
    sp = Splitter(set(), "none", ["world", "lo w"])
    # only a tail that may still become a stop string is held: "l", then "lo" may begin "lo w"
    assert [sp.safe(t) for t in ["Hel", "Hello", "Hello wor"]] == ["He", "l", ""]


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.text(alphabet=st.sampled_from(list("abc <{}\n")), min_size=1, max_size=4), max_size=12),
       choice=st.sampled_from(["auto", "none"]),
       stop=st.lists(st.text(alphabet=st.sampled_from(list("abc \n")), min_size=1, max_size=4), max_size=3))
def test_streamed_and_whole_replies_with_stop_strings_are_equal(pieces, choice, stop):
    seen, final = _engine_stream(pieces, stop)
    content, _ = parse(final, NAMES, choice)
    sp = Splitter(NAMES, choice, stop)
    sent = ""
    for text in seen:
        sent += sp.safe(text)
        assert (content or "").startswith(sent)
    assert sent + sp.rest(content) == (content or "")


def test_validation_names_what_it_refuses():
    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = validate.chat_request(dict(ok, max_completion_tokens=5, stop="x"), None)
    assert req.sampling.max_tokens == 5 and req.sampling.stop == ["x"] and req.tool_choice == "none"
    for extra, word in [({"logprobs": True}, "logprobs"), ({"n": 3}, "n=3"), ({"foo": 1}, "foo"),
                        ({"max_tokens": 3, "max_completion_tokens": 4}, "disagree"),
                        ({"temperature": 3}, "temperature"), ({"stream_options": {"include_usage": True}}, "stream")]:
        with pytest.raises(APIError) as e:
            validate.chat_request(dict(ok, **extra), None)
        assert e.value.status == 400 and word in e.value.message
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    norm = validate.messages(msgs)
    assert norm[0]["content"] == "ab" and norm[1]["tool_calls"][0]["id"] == "c1"
    with pytest.raises(APIError):
        validate.messages(msgs[:1] + msgs[2:])                        # a result for a call nobody made
    with pytest.raises(APIError):
        validate.messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_error_statuses():
    assert from_djinn(SessionNotFound("x")).status == 404
    assert from_djinn(CapacityError("x")).status == 429
    assert from_djinn(Cancelled("x")).status == 503


def test_tools_fall_back_to_the_system_prompt_and_tool_results_to_a_user_turn(smollm2):
    r = Renderer(smollm2.tokenizer)
    assert not r.native_tools                    # SmolLM2's template has no tool support
    tools = validate.tools([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}])
    msgs = validate.messages([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    req = validate.ChatRequest(model="m", messages=msgs, tools=tools, tool_choice="auto")
    text = smollm2.tokenizer.decode(r.prompt(req))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and '"name": "get_weather"' in text
    assert "<|im_start|>assistant\n" + call_text("get_weather", '{"city": "Paris"}') + "<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text
    # the next turn's rendering starts with this turn's prompt and ends on the end-of-turn token
    reply = {"role": "assistant", "content": "It is sunny."}
    nxt = r.with_reply(req, reply)
    assert nxt[: len(r.prompt(req))] == r.prompt(req) and nxt[-1] == smollm2.tokenizer.eos_token_id


def test_grammar_forces_a_valid_named_call_in_canonical_tokens(smollm2):
    """The grammar processor on the engine: the call parses and re-tokenizes to the same ids."""
    pytest.importorskip("xgrammar")
    from djinn.config import EngineConfig, MemoryConfig
    from djinn.engine import Engine, GenerateRequest, SamplingParams
    from djinn.server.http.grammar import ToolGrammars

    tok = smollm2.tokenizer
    tools = validate.tools([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"]}}}])
    req = validate.ChatRequest(model="m", messages=validate.messages([{"role": "user", "content": "Rome weather"}]),
                               tools=tools, tool_choice={"name": "get_weather"})
    grammars = ToolGrammars(tok, smollm2.config.vocab_size, [tok.eos_token_id])
    eng = Engine({"m": smollm2}, EngineConfig(memory=MemoryConfig(kv_blocks=64)))
    try:
        sid = eng.open_session("m")
        out = eng.generate(sid, GenerateRequest(Renderer(tok).prompt(req), SamplingParams(max_new_tokens=48),
                                                logits_processor=grammars.processor(tools, req.tool_choice, True)))
    finally:
        eng.shutdown()
    assert out.finish_reason == "stop"
    content, calls = parse(out.text, {"get_weather"}, req.tool_choice)
    assert content is None and len(calls) == 1
    args = json.loads(calls[0][1])
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f")
    text = tok.decode(out.token_ids, skip_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == out.token_ids
