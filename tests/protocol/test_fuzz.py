"""Hypothesis fuzzing of the decoder and the validators.

The property everywhere: whatever the bytes or the header, the result is a Message (and
then a valid request or an InvalidRequest/ProtocolError), never another exception type and
never a hang (sockets carry timeouts; the sender always ends with EOF)."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn.errors import InvalidRequest, ProtocolError
from djinn.protocol import (
    REPLIES, REQUESTS, Message, decode_frame, evaluate_expr, validate_expr, validate_reply, validate_request,
)
from djinn.protocol.frames import MAGIC, PREFIX, PROTOCOL_VERSION
from djinn.protocol.tensors import DTYPES
from tests.protocol.helpers import aread_raw, cases, count_case, examples, frame_bytes, recv_raw

OURS = (ProtocolError, InvalidRequest)
EXAMPLES = examples()
FRAMES = [frame_bytes(e.request, e.request_tensors) for e in EXAMPLES]
LIMIT = 1 << 20  # small, so random lengths hit it often

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def decode_and_validate(data: bytes) -> None:
    """The server's first two steps on untrusted bytes; only our error types may escape."""
    try:
        msg = decode_frame(data, max_bytes=LIMIT)
    except OURS:
        return
    check_message(msg)


def check_message(msg: Message) -> None:
    assert isinstance(msg.header, dict)
    for t in msg.tensors:
        assert isinstance(t, torch.Tensor) and t.dtype in DTYPES.values()
    try:
        validate_request(msg.header, msg.tensors)
    except OURS:
        pass


def check_stream_results(results: list) -> None:
    *messages, last = results
    for m in messages:
        check_message(m)
    assert isinstance(last, ProtocolError), repr(last)


@settings(max_examples=cases(1500))
@given(st.binary(max_size=300))
def test_random_bytes(data):
    count_case("fuzz: random bytes")
    decode_and_validate(data)


@settings(max_examples=cases(1000))
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
       st.binary(max_size=200))
def test_random_prefix_fields_then_random_body(version, flags, hlen, plen, body):
    count_case("fuzz: random prefix fields")
    version = PROTOCOL_VERSION if version < 128 else version  # mostly valid, to reach the header
    flags = 0 if flags < 200 else flags
    if hlen > 1000 and hlen % 3:
        hlen %= len(body) + 1
    decode_and_validate(PREFIX.pack(MAGIC, version, flags, hlen, plen) + body)


@settings(max_examples=cases(1500))
@given(st.sampled_from(range(len(FRAMES))), st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 10**6), st.integers(0, 255)),
    min_size=1, max_size=4))
def test_mutated_valid_frames(which, mutations):
    count_case("fuzz: mutated valid frames")
    data = bytearray(FRAMES[which])
    for kind, pos, byte in mutations:
        pos %= len(data) + (kind == "insert")
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << (byte % 8)
        elif kind == "set" and pos < len(data):
            data[pos] = byte
        elif kind == "insert":
            data.insert(pos, byte)
        elif kind == "delete" and pos < len(data):
            del data[pos]
    decode_and_validate(bytes(data))


def _frame(header_bytes: bytes, payload: bytes) -> bytes:
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(header_bytes), len(payload)) + header_bytes + payload


@settings(max_examples=cases(600))
@given(plain)
def test_header_of_any_plain_data(value):
    count_case("fuzz: arbitrary msgpack header")
    decode_and_validate(_frame(msgpack.packb(value, use_bin_type=True), b""))


descriptor = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPES, "complex64", "object", "", "float32 "]) | st.integers(-5, 5),
    "shape": st.lists(st.integers(-3, 5), max_size=10) | plain,
    "nbytes": st.integers(-8, 200) | plain,
}, optional={"extra": plain})


@settings(max_examples=cases(600))
@given(st.lists(descriptor, max_size=4), st.binary(max_size=400), st.booleans())
def test_random_tensor_descriptors(descs, payload, consistent):
    count_case("fuzz: tensor descriptors")
    if consistent:  # make nbytes agree with shape/dtype when it can, to reach the payload checks
        for d in descs:
            if d["dtype"] in DTYPES and isinstance(d["shape"], list) and all(type(x) is int for x in d["shape"]):
                d["nbytes"] = abs(math.prod(d["shape"])) * torch.empty((), dtype=DTYPES[d["dtype"]]).element_size()
    head = msgpack.packb({"op": "stats", "id": 1, "tensors": descs}, use_bin_type=True)
    decode_and_validate(_frame(head, payload))


@settings(max_examples=cases(1000))
@given(st.sampled_from(EXAMPLES), st.data())
def test_request_fields_replaced_added_or_removed(ex, data):
    count_case("fuzz: request fields")
    header = dict(ex.request)
    action = data.draw(st.sampled_from(["replace", "add", "remove", "nested"]))
    key = data.draw(st.sampled_from(sorted(header)))
    if action == "replace":
        header[key] = data.draw(plain)
    elif action == "add":
        header[data.draw(st.text(max_size=8))] = data.draw(plain)
    elif action == "remove":
        del header[key]
    else:
        header[key] = _mutate_nested(header[key], data)
    decode_and_validate(frame_bytes(header, ex.request_tensors))


def _mutate_nested(value, data):
    if isinstance(value, dict) and value:
        k = data.draw(st.sampled_from(sorted(value)))
        return {**value, k: _mutate_nested(value[k], data)}
    if isinstance(value, list) and value:
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + [_mutate_nested(value[i], data)] + value[i + 1:]
    return data.draw(plain)


@settings(max_examples=cases(600))
@given(st.sampled_from(EXAMPLES), st.data())
def test_reply_fields_replaced(ex, data):
    count_case("fuzz: reply fields")
    header = dict(ex.reply)
    key = data.draw(st.sampled_from(sorted(header)))
    header[key] = _mutate_nested(header[key], data) if data.draw(st.booleans()) else data.draw(plain)
    try:
        validate_reply(ex.op, header, ex.reply_tensors)
    except ProtocolError:
        pass


@settings(max_examples=cases(300))
@given(st.sampled_from(sorted(REQUESTS)), st.dictionaries(st.sampled_from(
    sorted({f for s in REQUESTS.values() for f in s.fields} | {"op", "id"})), plain, max_size=6))
def test_headers_built_from_known_field_names(op, fields):
    count_case("fuzz: known field names, random values")
    try:
        validate_request({"op": op, "id": 1, **fields})
    except OURS:
        pass
    assert set(REQUESTS) == set(REPLIES)


expr_leaf = st.fixed_dictionaries({"ref": st.sampled_from(["h", "w", "m", "nope", ""])}) | st.fixed_dictionaries(
    {"tensor": st.integers(-1, 4)}) | st.fixed_dictionaries({"scalar": st.integers(-3, 3) | st.floats()})
index_item = (st.fixed_dictionaries({"int": st.integers(-4, 4)})
              | st.fixed_dictionaries({"slice": st.lists(st.none() | st.integers(-4, 4), min_size=3, max_size=3)})
              | st.just({"none": True}) | st.just({"ellipsis": True}) | plain)
expr_tree = st.recursive(expr_leaf | plain, lambda inner: (
    st.fixed_dictionaries({"op": st.sampled_from(["add", "sub", "mul", "div"]),
                           "args": st.lists(inner, min_size=2, max_size=2)})
    | st.fixed_dictionaries({"op": st.just("neg"), "args": st.lists(inner, min_size=1, max_size=1)})
    | st.fixed_dictionaries({"op": st.just("getitem"), "args": st.lists(inner, min_size=1, max_size=1),
                             "index": st.lists(index_item, max_size=4)})
    | st.fixed_dictionaries({"op": plain, "args": st.lists(inner, max_size=3)})), max_leaves=12)


@settings(max_examples=cases(800))
@given(expr_tree)
def test_random_expression_trees_validate_and_evaluate_safely(tree):
    count_case("fuzz: expression trees")
    server = {"h": torch.randn(2, 3, 4), "w": torch.randn(4), "m": torch.tensor([True, False, True, True])}

    def resolve(tid):
        if tid not in server:
            raise InvalidRequest(f"no tensor {tid!r}")
        return server[tid]

    payload = [torch.randn(3, 4), torch.arange(4), torch.tensor([True, False, False, True]),
               torch.randn(4).to(torch.bfloat16)]
    try:
        validate_expr(tree, n_tensors=len(payload))
    except InvalidRequest:
        return
    try:
        out = evaluate_expr(tree, resolve, payload)
    except InvalidRequest:
        return
    assert isinstance(out, torch.Tensor)


@pytest.mark.timeout(120)
@settings(max_examples=cases(150))
@given(st.sampled_from(range(len(FRAMES))), st.integers(0, 10**6), st.integers(0, 255), st.booleans(),
       st.binary(max_size=64))
def test_streams_never_hang_or_leak_other_errors(which, pos, byte, truncate, tail):
    """The same mutations through real sockets, sync and asyncio, ending in EOF."""
    count_case("fuzz: socket + asyncio streams")
    data = bytearray(FRAMES[which] * 2)
    pos %= len(data)
    if truncate:
        del data[pos:]
    else:
        data[pos] = byte
    data += tail
    check_stream_results(recv_raw(bytes(data), max_bytes=LIMIT))
    check_stream_results(aread_raw(bytes(data), max_bytes=LIMIT))
