"""The schema of every op: defaults, unknown/missing/wrong fields named, error mapping."""

from __future__ import annotations

import copy

import pytest
import torch

from djinn import errors
from djinn.errors import InvalidRequest, ProtocolError
from djinn.protocol import (
    REPLIES, REQUESTS, error_from_wire, error_reply, error_to_wire, make_request, ok_reply, request_id,
    validate_reply, validate_request,
)
from djinn.protocol.schema import Struct
from tests.protocol.helpers import examples

EXAMPLES = examples()


def test_examples_cover_every_op():
    assert {e.op for e in EXAMPLES} == set(REQUESTS) == set(REPLIES)


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: e.op)
def test_examples_validate(ex):
    req = validate_request(ex.request, ex.request_tensors)
    assert req["op"] == ex.op and req["id"] == ex.request["id"]
    for key, value in ex.request.items():
        assert req[key] == value
    rep = validate_reply(ex.op, ex.reply, ex.reply_tensors)
    assert rep["id"] == ex.reply["id"]


def test_defaults_are_filled_in():
    req = validate_request({"op": "generate", "id": 1, "session_id": "s1", "prompt": "hi"})
    assert req == {"op": "generate", "id": 1, "session_id": "s1", "prompt": "hi", "max_new_tokens": 32,
                   "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": [],
                   "stop_token_ids": [], "chat": None, "interventions": [], "capture": [], "breakpoint": None}
    again = validate_request({"op": "generate", "id": 2, "session_id": "s1", "prompt": "hi"})
    assert again["stop"] is not req["stop"]  # defaults are not shared mutable objects
    assert validate_request({"op": "hello", "id": 1, "version": 1}) == {
        "op": "hello", "id": 1, "version": 1, "token": None, "client": ""}
    assert validate_request({"op": "generate", "id": 1, "session_id": "s", "prompt": "x", "temperature": 1})[
        "temperature"] == 1.0 and isinstance(validate_request(
            {"op": "generate", "id": 1, "session_id": "s", "prompt": "x", "temperature": 1})["temperature"], float)


def _fields(op: str, required: bool) -> list[str]:
    return [k for k, f in REQUESTS[op].fields.items() if f.required == required]


@pytest.mark.parametrize("op,field", [(op, f) for op in REQUESTS for f in _fields(op, True)])
def test_missing_required_field_is_named(op, field):
    ex = next(e for e in EXAMPLES if e.op == op)
    bad = {k: v for k, v in ex.request.items() if k != field}
    with pytest.raises(InvalidRequest, match=f"missing required field '{field}'"):
        validate_request(bad, ex.request_tensors)


@pytest.mark.parametrize("op", list(REQUESTS))
def test_unknown_field_is_named(op):
    ex = next(e for e in EXAMPLES if e.op == op)
    with pytest.raises(InvalidRequest, match="unknown field 'bogus'"):
        validate_request({**ex.request, "bogus": 1}, ex.request_tensors)
    with pytest.raises(ProtocolError, match="unknown field 'bogus'"):
        validate_reply(op, {**ex.reply, "bogus": 1}, ex.reply_tensors)


class _Alien:
    pass


@pytest.mark.parametrize("op,field", [(op, f) for op in REQUESTS for f in REQUESTS[op].fields])
def test_wrong_type_is_named(op, field):
    ex = next(e for e in EXAMPLES if e.op == op)
    for wrong in (_Alien(), b"bytes" if field != "prompt" else 1.5, {"x": 1}):
        with pytest.raises(InvalidRequest, match=rf"^{op}\.{field}"):
            validate_request({**ex.request, field: wrong}, ex.request_tensors)


@pytest.mark.parametrize("header,match", [
    ({"id": 1}, "unknown op None"),
    ({"op": "pickle", "id": 1}, "unknown op 'pickle'"),
    ({"op": ["hello"], "id": 1}, "unknown op"),
    ({"op": "stats"}, "stats.id"),
    ({"op": "stats", "id": 0}, "out of range"),
    ({"op": "stats", "id": True}, "expected an int"),
    ({"op": "stats", "id": 2**63}, "out of range"),
])
def test_bad_envelope_is_a_protocol_error(header, match):
    with pytest.raises(ProtocolError, match=match):
        validate_request(header)


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.1, "out of range"),
    ("temperature", float("nan"), "not a finite"),
    ("top_p", 0.0, "out of range"),
    ("top_p", 1.5, "out of range"),
    ("max_new_tokens", -1, "out of range"),
    ("max_new_tokens", True, "expected an int"),
    ("seed", -1, "out of range"),
    ("prompt", [1, -2], r"prompt\[1\]"),
    ("prompt", [1, 2.0], r"prompt\[1\]"),
    ("stop", [""], "expected 1 to 1024"),
    ("capture", [3, 3], "distinct"),
    ("capture", [5000], "out of range"),
    ("session_id", "../etc", "does not match"),
    ("session_id", "", "does not match"),
    ("breakpoint", {"layer": 1}, "missing required field 'step'"),
    ("interventions", [{"kind": "scale", "layer": 1}], "missing required field 'factor'"),
    ("interventions", [{"kind": "scale", "layer": 1, "factor": 1.0, "vector": 0}], "unknown field 'vector'"),
    ("interventions", [{"kind": "add", "layer": 1, "factor": 1.0}], "unknown field 'factor'"),
    ("interventions", [{"kind": "rotate", "layer": 1}], r"interventions\[0\]\.kind"),
    ("interventions", [{"kind": "add", "layer": 1, "vector": 3}], "frame carries 1 tensors"),
    ("interventions", [{"kind": "scale", "layer": 1, "factor": float("inf")}], "not a finite"),
])
def test_generate_field_bounds(field, value, match):
    ex = next(e for e in EXAMPLES if e.op == "generate")
    with pytest.raises(InvalidRequest, match=match):
        validate_request({**ex.request, field: value}, ex.request_tensors)


def test_payload_indices_check_dtype_family():
    forward = {"op": "forward", "id": 1, "session_id": "s1", "input_ids": 0}
    validate_request(forward, [torch.tensor([1, 2])])
    with pytest.raises(InvalidRequest, match="integer tensor"):
        validate_request(forward, [torch.tensor([1.0])])
    with pytest.raises(InvalidRequest, match="frame carries 0 tensors"):
        validate_request(forward)
    resume = {"op": "resume", "id": 1, "paused_id": "p1", "activation": 0}
    with pytest.raises(InvalidRequest, match="floating-point tensor"):
        validate_request(resume, [torch.tensor([1])])
    with pytest.raises(InvalidRequest, match=r"resume\.activation.*frame's 0 tensors"):
        validate_request({**resume, "activation": {"op": "neg", "args": [{"tensor": 0}]}})
    with pytest.raises(InvalidRequest, match="expected None or a payload tensor index or an expression"):
        validate_request({**resume, "activation": "t1"})


@pytest.mark.parametrize("op,reply,match", [
    ("forward", {"id": 1, "ok": True}, "exactly one of paused, logits"),
    ("forward", {"id": 1, "ok": True, "paused": None}, "expected a map"),
    ("resume", {"id": 1, "ok": True, "paused": None}, "at least one of"),
    ("generate", {"id": 1, "ok": True, "token_ids": [], "text": "", "finish_reason": "eos"}, "not one of"),
    ("generate", {"id": 1, "ok": True, "token_ids": [], "text": "", "finish_reason": "stop",
                  "captured": {"six": None}}, "captured key"),
    ("model_info", {"id": 1, "ok": True, "name": "m", "config": {}, "num_layers": 1, "is_chat": False,
                    "tokenizer": {"files": {"../x": b""}}}, "does not match"),
    ("model_info", {"id": 1, "ok": True, "name": "m", "config": {"f": b"x"}, "num_layers": 1,
                    "is_chat": False, "tokenizer": {"files": {}}}, "not JSON-able"),
    ("stats", {"id": 1, "ok": True, "stats": {"a": [[[[1]]]]} }, None),
    ("fetch", {"id": 1, "ok": True, "tensor": 0}, "frame carries 0"),
    ("stats", {"id": 1, "ok": "yes", "stats": {}}, "expected a bool"),
    ("stats", {"id": 1, "ok": False}, "missing required field 'error'"),
    ("stats", {"id": 1, "ok": False, "error": {"code": "x"}}, "missing required field 'message'"),
])
def test_reply_schema(op, reply, match):
    if match is None:
        validate_reply(op, reply)
        return
    with pytest.raises(ProtocolError, match=match):
        validate_reply(op, reply)


def test_json_depth_is_bounded_without_recursion():
    deep: list = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(ProtocolError, match="deeper than 32"):
        validate_reply("stats", {"id": 1, "ok": True, "stats": {"x": deep}})


def test_validation_does_not_modify_its_input():
    ex = next(e for e in EXAMPLES if e.op == "generate")
    before = copy.deepcopy(ex.request)
    validate_request(ex.request, ex.request_tensors)
    assert ex.request == before


@pytest.mark.parametrize("cls", [c for c in vars(errors).values()
                                 if isinstance(c, type) and issubclass(c, errors.DjinnError)])
def test_typed_errors_cross_the_wire_as_themselves(cls):
    reply = error_reply(7, cls("what went wrong and what to do"))
    checked = validate_reply("stats", reply)
    exc = error_from_wire(checked["error"])
    assert type(exc) is cls and str(exc) == "what went wrong and what to do"


def test_other_exceptions_map_to_internal_or_capacity():
    assert error_to_wire(KeyError("k")) == {"code": "djinn_error", "message": "internal server error: KeyError: 'k'"}
    assert error_to_wire(MemoryError())["code"] == "capacity"
    assert type(error_from_wire(error_to_wire(torch.OutOfMemoryError("cuda")))) is errors.CapacityError
    assert type(error_from_wire({"code": "from_the_future", "message": "m"})) is errors.DjinnError
    assert len(error_to_wire(InvalidRequest("x" * 100_000))["message"]) == 8192
    with pytest.raises(ProtocolError):
        error_from_wire({"code": 1, "message": "m"})


def test_builders_and_request_id():
    assert make_request("fork", 3, session_id="s1") == {"op": "fork", "id": 3, "session_id": "s1"}
    assert ok_reply(3, session_id="s2") == {"id": 3, "ok": True, "session_id": "s2"}
    assert request_id({"id": 5}) == 5
    assert request_id({"id": "5"}) == request_id([]) == request_id({"id": True}) == 0


def test_every_schema_is_a_struct_with_documented_fields():
    for table in (REQUESTS, REPLIES):
        for op, schema in table.items():
            assert isinstance(schema, Struct), op
            assert "op" not in schema.fields and "id" not in schema.fields and "tensors" not in schema.fields


def test_long_token_lists_validate_fast():
    import time
    prompt = list(range(1 << 20))
    start = time.perf_counter()
    validate_request({"op": "generate", "id": 1, "session_id": "s1", "prompt": prompt})
    assert time.perf_counter() - start < 1.0
    with pytest.raises(InvalidRequest, match=r"prompt\[77\]: -1 is out of range"):
        validate_request({"op": "generate", "id": 1, "session_id": "s1", "prompt": prompt[:77] + [-1]})
