"""The tensor codec on its own: the closed dtype set, descriptors, in-place views."""

from __future__ import annotations

import pytest
import torch

from djinn.errors import ProtocolError
from djinn.protocol.tensors import (
    DTYPES, check_descriptor, describe, dtype_name, padded, prepare_tensor, tensor_buffer, tensor_from_payload,
)


def test_the_dtype_set_is_closed_and_named():
    assert set(DTYPES) == {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                           "uint8", "bool"}
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
    for dtype in (torch.complex64, torch.uint16, torch.float8_e4m3fn):
        with pytest.raises(ProtocolError, match="allowed: float32"):
            dtype_name(dtype)


def test_prepare_is_a_no_op_for_plain_contiguous_cpu_tensors():
    t = torch.randn(3, 4)
    assert prepare_tensor(t) is t or prepare_tensor(t).data_ptr() == t.data_ptr()
    g = torch.randn(3, requires_grad=True)
    assert not prepare_tensor(g).requires_grad and prepare_tensor(g).data_ptr() == g.data_ptr()
    nc = torch.randn(4, 4).t()
    assert prepare_tensor(nc).is_contiguous() and torch.equal(prepare_tensor(nc), nc)


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_buffer_and_view_round_trip_in_place(dtype):
    t = (torch.arange(12) % 2).to(dtype).reshape(3, 4)
    buf = bytearray(bytes(tensor_buffer(t)))
    d = describe(t)
    assert d == {"dtype": dtype_name(dtype), "shape": [3, 4], "nbytes": 12 * t.element_size()}
    back = tensor_from_payload(buf, 0, *check_descriptor(d, 0, 1 << 20))
    assert torch.equal(back, t)
    back[0, 0] = 1  # writable, and a view of the buffer: a second view sees the write
    assert tensor_from_payload(buf, 0, *check_descriptor(d, 0, 1 << 20))[0, 0] == 1


def test_misaligned_tensor_is_copied_to_an_aligned_one():
    values = torch.tensor([1.5, -2.0, 3.25])
    buf = bytearray(1) + bytearray(bytes(tensor_buffer(values)))  # offset 1: misaligned for float32
    t = tensor_from_payload(buf, 1, torch.float32, (3,), 12)
    assert torch.equal(t, values) and t.data_ptr() % 4 == 0


def test_descriptor_limits():
    ok = {"dtype": "float32", "shape": [2, 3], "nbytes": 24}
    assert check_descriptor(ok, 0, 24) == (torch.float32, (2, 3), 24)
    with pytest.raises(ProtocolError, match="exceeds the message limit"):
        check_descriptor(ok, 0, 23)
    with pytest.raises(ProtocolError, match=r"tensors\[3\]: nbytes=4 but shape \[2, 3\] of float32 needs 24"):
        check_descriptor({**ok, "nbytes": 4}, 3, 1 << 20)
    with pytest.raises(ProtocolError, match="at most 8"):
        check_descriptor({**ok, "shape": [1] * 9, "nbytes": 4}, 0, 1 << 20)
    with pytest.raises(ProtocolError, match="non-negative"):
        check_descriptor({**ok, "shape": [-2, -3]}, 0, 1 << 20)
    assert check_descriptor({"dtype": "bool", "shape": [0, 5], "nbytes": 0}, 0, 0)[2] == 0
    assert [padded(n) for n in (0, 1, 7, 8, 9)] == [0, 8, 8, 8, 16]
