"""Fused RMSNorm and rotary kernels against transformers' own modules and functions (the
oracle): through Triton's interpreter on CPU, compiled on CUDA (gpu-marked)."""

from __future__ import annotations


import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from tests.conftest import requires_cuda, run_interpreted


def check(device: str, dtype: torch.dtype, atol: float) -> None:
    from djinn.engine.fused import apply_rotary, rms_norm

    g = torch.Generator().manual_seed(0)
    for hidden, rows in ((64, 3), (576, 5), (4096, 2)):
        norm = LlamaRMSNorm(hidden, eps=1e-5).to(device=device, dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(hidden, generator=g))
        x = torch.randn(1, rows, hidden, generator=g).to(device=device, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(rms_norm(norm, x), norm(x), atol=atol, rtol=atol)
    for hq, hk, t, d in ((4, 2, 7, 16), (32, 32, 3, 128), (9, 3, 1, 64)):
        # laid out as transformers' projections produce them: [1, T, H, D] viewed as [1, H, T, D]
        q = torch.randn(1, t, hq, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(1, t, hk, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        ang = torch.randn(1, t, d // 2, generator=g).repeat(1, 1, 2)
        cos, sin = ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)
        got = apply_rotary(q, k, cos, sin, _original=apply_rotary_pos_emb)
        want = apply_rotary_pos_emb(q, k, cos, sin)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def interpreted_checks() -> None:
    check("cpu", torch.float32, 1e-5)
    print("interpreted fused checks passed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested instead")
def test_fused_kernels_interpreted_equal_transformers():
    run_interpreted("tests.engine.test_fused:interpreted_checks", timeout=240)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_fused_kernels_on_cuda_equal_transformers(dtype, atol):
    check("cuda", dtype, atol)


def test_fused_ops_are_scoped(tiny_llama):
    from djinn.engine import fused
    from transformers.models.llama import modeling_llama

    model = tiny_llama.model
    orig = modeling_llama.apply_rotary_pos_emb
    with fused.fused_ops(model):
        assert modeling_llama.apply_rotary_pos_emb is not orig
        assert "forward" in model.model.norm.__dict__
        with fused.fused_ops(model):
            pass
        assert "forward" in model.model.norm.__dict__          # the inner block left the outer's patch
    assert modeling_llama.apply_rotary_pos_emb is orig
    assert "forward" not in model.model.norm.__dict__
