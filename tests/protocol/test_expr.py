"""Remote-tensor expressions: builder -> tree -> wire -> validate -> evaluate equals torch."""

from __future__ import annotations

import operator
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn.errors import InvalidRequest
from djinn.protocol import Expr, UnsupportedOperation, decode_frame, evaluate_expr, validate_expr, validate_request
from djinn.protocol.expr import SUPPORTED
from tests.protocol.helpers import cases, count_case, frame_bytes

G = torch.Generator().manual_seed(0)
SERVER = {"h": torch.randn(2, 3, 4, generator=G), "w": torch.randn(4, generator=G),
          "i": torch.arange(12).reshape(3, 4)}


def run(expr: Expr) -> torch.Tensor:
    """Build the tree, send it through a real frame, validate as a request, evaluate."""
    tensors: list = []
    tree = expr.encode(tensors)
    msg = decode_frame(frame_bytes({"op": "fetch", "id": 1, "tensor_id": "h", "expr": tree}, tensors))
    req = validate_request(msg.header, msg.tensors)
    return evaluate_expr(req["expr"], SERVER.__getitem__, msg.tensors)


def test_the_api_examples():
    h, w = SERVER["h"], SERVER["w"]
    x = Expr.ref("h")
    v = torch.randn(4, generator=G)
    cases = [
        (x * 0.9, h * 0.9),
        (0.9 * x, 0.9 * h),
        (x + v, h + v),
        (v + x, v + h),
        (v - x, v - h),
        (v * x, v * h),
        (v / x, v / h),
        (2 - x, 2 - h),
        (1 / x, 1 / h),
        (x / 3, h / 3),
        (-x, -h),
        (x - Expr.ref("w"), h - w),
        (x * Expr.ref("w") + x, h * w + h),
        (x[0], h[0]),
        (x[-1, 1:, ::2], h[-1, 1:, ::2]),
        (x[..., None, 2], h[..., None, 2]),
        (x[:, None, :, 1:3][0], h[:, None, :, 1:3][0]),
        (torch.mul(v, x), v * h),
        (v.sub(x), v - h),
        (torch.neg(x), -h),
        (Expr.ref("i") / 2, SERVER["i"] / 2),
        (Expr.ref("i") * 2 + 1, SERVER["i"] * 2 + 1),
    ]
    for expr, expected in cases:
        got = run(expr)
        assert got.dtype == expected.dtype and torch.equal(got, expected), expr


_BINOPS = [operator.add, operator.sub, operator.mul, operator.truediv]


@st.composite
def programs(draw):
    """A random sequence of steps applied both to an Expr and to the tensor it stands for."""
    return draw(st.lists(st.tuples(st.sampled_from(["binop", "rbinop", "neg", "index"]),
                                   st.sampled_from(_BINOPS),
                                   st.sampled_from(["scalar", "client", "ref"]),
                                   st.floats(-4, 4, allow_nan=False).filter(lambda f: abs(f) > 0.1),
                                   st.integers(0, 3)), min_size=1, max_size=12))


@settings(max_examples=cases(300))
@given(programs())
def test_random_expressions_match_torch(steps):
    count_case("expr: random program vs torch")
    expr, expected = Expr.ref("h"), SERVER["h"]
    for kind, op, operand, scalar, k in steps:
        if kind == "neg":
            expr, expected = -expr, -expected
            continue
        if kind == "index":
            if expected.dim() == 0:
                continue
            idx = [(slice(None, None, k + 1),), (Ellipsis, None), (k % expected.shape[0],), (slice(-k - 1, None),)][k]
            expr, expected = expr[idx], expected[idx]
            continue
        if operand == "scalar":
            other_e = other_t = scalar
        elif operand == "client":
            other_e = other_t = torch.full((expected.shape[-1],) if expected.dim() else (), scalar)
        else:
            if expected.dim() == 0 or expected.shape[-1] != 4:
                other_e, other_t = scalar, scalar
            else:
                other_e, other_t = Expr.ref("w"), SERVER["w"]
        if kind == "binop":
            expr, expected = op(expr, other_e), op(expected, other_t)
        else:
            expr, expected = op(other_e, expr), op(other_t, expected)
    got = run(expr)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_client_tensors_are_sent_once_each():
    v = torch.ones(4)
    tensors: list = []
    tree = (Expr.ref("h") * v + v - Expr.tensor(v)).encode(tensors)
    assert len(tensors) == 1 and tensors[0] is v
    assert validate_expr(tree, n_tensors=1) == 7
    assert (Expr.ref("h") * Expr.ref("w") + Expr.ref("h")).ref_ids() == ["h", "w"]


def test_shape_mismatch_is_an_invalid_request_with_shapes():
    with pytest.raises(InvalidRequest, match=r"cannot add tensors of shapes \[2, 3, 4\] and \[5\]"):
        run(Expr.ref("h") + torch.ones(5))
    with pytest.raises(InvalidRequest, match=r"cannot index a tensor of shape \[2, 3, 4\]"):
        run(Expr.ref("h")[5])
    with pytest.raises(InvalidRequest, match=r"cannot index"):
        run(Expr.ref("h")[0, 0, 0, 0])


def test_result_size_is_bounded():
    tree = (Expr.ref("h")[..., None] * Expr.tensor(torch.ones(1000))).encode(tensors := [])
    with pytest.raises(InvalidRequest, match="limit is 1000"):
        evaluate_expr(tree, SERVER.__getitem__, tensors, max_numel=1000)


def test_depth_and_node_limits():
    deep = Expr.ref("h")
    for _ in range(40):
        deep = -deep
    with pytest.raises(InvalidRequest, match="deeper than 32"):
        validate_expr(deep.encode([]))
    validate_expr(deep.encode([]), max_depth=41)
    wide = Expr.ref("h")
    for _ in range(10):
        wide = wide + wide  # a DAG in memory, 2**11 - 1 nodes on the wire
    with pytest.raises(InvalidRequest, match="more than 2000 nodes"):
        validate_expr(wide.encode([], max_nodes=3000), max_nodes=2000)
    for _ in range(50):
        wide = wide + wide  # 2**61 nodes if expanded: encode stops at the limit instead
    with pytest.raises(InvalidRequest, match="more than 256 nodes"):
        wide.encode([])
    assert wide.ref_ids() == ["h"] and "..." in repr(wide)  # neither walks 2**60 nodes
    with pytest.raises(InvalidRequest, match="more than 4 nodes"):
        validate_expr((Expr.ref("h") + 1 + 2).encode([]), max_nodes=4)


@pytest.mark.parametrize("tree,match", [
    ({"scalar": 1}, "must be tensor-valued"),
    ({"op": "add", "args": [{"scalar": 1}, {"scalar": 2}]}, "needs a tensor argument"),
    ({"op": "pow", "args": [{"ref": "h"}, {"scalar": 2}]}, "unknown op 'pow'"),
    ({"op": "__import__", "args": [{"ref": "h"}]}, "unknown op"),
    ({"op": ["add"], "args": []}, "op must be a string"),
    ({"op": "add", "args": [{"ref": "h"}]}, "takes 2 argument"),
    ({"op": "neg", "args": {"ref": "h"}}, "takes 1 argument"),
    ({"op": "neg", "args": [{"ref": "h"}], "extra": 1}, "takes fields"),
    ({"op": "getitem", "args": [{"ref": "h"}]}, "takes fields"),
    ({"op": "getitem", "args": [{"ref": "h"}], "index": [{"slice": [0, 1, -1]}]}, "step must be >= 1"),
    ({"op": "getitem", "args": [{"ref": "h"}], "index": [{"slice": [0, 1]}]}, "a slice is"),
    ({"op": "getitem", "args": [{"ref": "h"}], "index": [{"ellipsis": True}, {"ellipsis": True}]}, "one ellipsis"),
    ({"op": "getitem", "args": [{"ref": "h"}], "index": [{"int": 1.5}]}, "64-bit int"),
    ({"op": "getitem", "args": [{"ref": "h"}], "index": [{"bool": True}]}, "unknown index kind"),
    ({"op": "getitem", "args": [{"ref": "h"}], "index": [{"none": 1}]}, "expected"),
    ({"op": "getitem", "args": [{"ref": "h"}], "index": [{"int": 0}] * 17}, "at most 16"),
    ({"ref": "h", "tensor": 0}, "a leaf is one of"),
    ({"ref": 3}, "tensor id"),
    ({"ref": "../../etc/passwd"}, "tensor id"),
    ({"tensor": 1}, "not one of the frame's 1 tensors"),
    ({"tensor": -1}, "not one of"),
    ({"scalar": "1"}, "int or float"),
    ({"scalar": True}, "int or float"),
    ({"code": "print(1)"}, "unknown leaf"),
    ([{"ref": "h"}], "expected an expression node"),
    ({"op": "mul", "args": [{"ref": "h"}, 0.5]}, r"args\[1\]: expected an expression node"),
])
def test_malformed_trees(tree, match):
    with pytest.raises(InvalidRequest, match=match):
        validate_expr(tree, n_tensors=1)


def test_unknown_refs_raise_the_resolvers_error():
    def resolve(tid):
        raise InvalidRequest(f"no tensor {tid!r} in this session")
    with pytest.raises(InvalidRequest, match="no tensor 'zz'"):
        evaluate_expr({"ref": "zz"}, resolve, [])


@pytest.mark.parametrize("action,name", [
    (lambda x: x @ torch.ones(4), "@ (matmul)"),
    (lambda x: torch.ones(4) @ x, "torch.matmul"),
    (lambda x: x.sum(), ".sum"),
    (lambda x: torch.sum(x), "torch.sum"),
    (lambda x: x.reshape(4), ".reshape"),
    (lambda x: x ** 2, "** (pow)"),
    (lambda x: x // 2, "// (floordiv)"),
    (lambda x: abs(x), "abs()"),
    (lambda x: x > 0, "comparison"),
    (lambda x: x == 0, "comparison"),
    (lambda x: bool(x), "bool()"),
    (lambda x: list(x), "iteration"),
    (lambda x: float(x), "conversion"),
    (lambda x: torch.cat([x, x]), "torch.cat"),
    (lambda x: torch.add(torch.ones(1), x, alpha=2), "keywords ['alpha']"),
    (lambda x: x[torch.tensor([0])], "indexing with Tensor"),
    (lambda x: x[[0, 1]], "indexing with list"),
    (lambda x: x[0.5], "indexing with float"),
    (lambda x: torch.ones(3)[x], "torch.__getitem__"),
])
def test_unsupported_operations_name_themselves_and_the_supported_ones(action, name):
    with pytest.raises(UnsupportedOperation) as info:
        action(Expr.ref("h"))
    assert name in str(info.value) and SUPPORTED in str(info.value) and ".fetch()" in str(info.value)
    assert isinstance(info.value, InvalidRequest)


def test_operand_types():
    x = Expr.ref("h")
    for bad, text in (("1", "+ with a str"), ([1, 2], "* with a list"), (True, "+ with a bool")):
        with pytest.raises(UnsupportedOperation, match=re.escape(text)):
            (x * bad) if isinstance(bad, list) else (x + bad)
    with pytest.raises(UnsupportedOperation, match="/ with a str"):
        "1" / x
    with pytest.raises(InvalidRequest, match="64 bits"):
        x + 2**64
    with pytest.raises(InvalidRequest, match="not a tensor id"):
        Expr.ref("a b")
    assert not hasattr(x, "shape")  # an AttributeError too, so hasattr works
    import numpy as np
    assert (x * np.float32(0.5)).encode([]) == {"op": "mul", "args": [{"ref": "h"}, {"scalar": 0.5}]}

    class Remote:  # what the client's RemoteTensor does to take part in expressions
        def __djinn_expr__(self):
            return Expr.ref("w")
    assert (x + Remote()).ref_ids() == ["h", "w"]
    assert "ref('h') * 0.5" in repr(x * 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_client_tensors_meet_server_tensors_on_the_gpu():
    """The server's refs live on the GPU, payload tensors arrive on the CPU."""
    h = SERVER["h"].cuda()
    v = torch.randn(4)
    tensors: list = []
    tree = ((Expr.ref("h") * v)[0] - Expr.tensor(v) / 2).encode(tensors)
    got = evaluate_expr(tree, {"h": h}.__getitem__, tensors)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), (SERVER["h"] * v)[0] - v / 2)
    back = decode_frame(frame_bytes({"op": "stats", "id": 1}, [got, h.to(torch.bfloat16)])).tensors  # sent from the GPU
    assert torch.equal(back[0], got.cpu()) and torch.equal(back[1], h.to(torch.bfloat16).cpu())
