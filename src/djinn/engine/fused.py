"""Fused GPU kernels for the small elementwise pieces of Llama-family layers, in batched forwards.

Why: at batch 1 a decode step of a 7B model is weight reads plus ~1,200 kernel launches, and
most launches are tiny elementwise ops that cost ~2 us each even inside a CUDA graph.
transformers' ``LlamaRMSNorm`` is 8 kernels (cast, pow, mean, add, rsqrt, mul, cast, mul) and
rotary on q and k about 10 per layer; fused, they are 2 + 1 per layer. Measured on the H100
(``djinn bench decode``, llama2-7b fp16, CUDA graphs, 1,024 tokens of context, same run):
batch 1 8.54 -> 7.04 ms per step, batch 32 15.54 -> 12.99 ms
(benchmarks/results/decode-cuda-20261125T204707.json, keys ``rows`` and ``unfused``).

Scope, deliberately narrow: only classes whose code is exactly Llama's formula (an allowlist
by class name, checked against transformers 5.17), only CUDA tensors and only while
``fused_ops(model)`` is active (Djinn's batched forwards); everything else, including
transformers' own ``generate`` on the same model, runs transformers' code unchanged.
Numerics follow transformers' order of operations (fp32 statistics, cast to the input dtype,
then the weight product), so results differ only by the order of the mean's summation.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import weakref
from typing import Iterator

import torch

# Triton's CPU interpreter (tests) runs the same kernels on CPU tensors
_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
NORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_kernel(X, W, Y, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / N
        h = (xf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
        w = tl.load(W + offs, mask=mask, other=0.0)
        y = w.to(tl.float32) * h.to(tl.float32)
        tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def rope_kernel(Q, K, C, S, OQ, OK,
                    sq_h, sq_t, sk_h, sk_t, sc_t, so_t, so_h, sok_t, sok_h,
                    HQ, HALF: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        c1 = tl.load(C + t * sc_t + offs, mask=mask, other=0.0)
        c2 = tl.load(C + t * sc_t + HALF + offs, mask=mask, other=0.0)
        s1 = tl.load(S + t * sc_t + offs, mask=mask, other=0.0)
        s2 = tl.load(S + t * sc_t + HALF + offs, mask=mask, other=0.0)
        if h < HQ:
            src = Q + h * sq_h + t * sq_t
            dst = OQ + t * so_t + h * so_h
        else:
            src = K + (h - HQ) * sk_h + t * sk_t
            dst = OK + t * sok_t + (h - HQ) * sok_h
        x1 = tl.load(src + offs, mask=mask, other=0.0)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product rounded to the
        # tensor dtype as transformers' separate kernels round it
        a1 = (x1 * c1).to(x1.dtype)
        b1 = (-x2 * s1).to(x1.dtype)
        a2 = (x2 * c2).to(x1.dtype)
        b2 = (x1 * s2).to(x1.dtype)
        tl.store(dst + offs, (a1 + b1).to(x1.dtype), mask=mask)
        tl.store(dst + HALF + offs, (a2 + b2).to(x1.dtype), mask=mask)

    return rms_kernel, rope_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(module, hidden: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` in one kernel (falls back to the module's code off CUDA)."""
    w = module.weight
    if not (hidden.is_cuda or _ON_CPU) or hidden.stride(-1) != 1:
        return type(module).forward(module, hidden)
    rms_kernel, _ = _kernels()
    n = hidden.shape[-1]
    x = hidden.reshape(-1, n)
    y = torch.empty(x.shape, dtype=torch.promote_types(w.dtype, hidden.dtype), device=hidden.device)
    rms_kernel[(x.shape[0],)](x, w, y, x.stride(0), y.stride(0), n, module.variance_epsilon,
                              BLOCK=_pow2(n), num_warps=8 if n >= 2048 else 4)
    return y.view(*hidden.shape[:-1], n)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
                 _original=None):
    """``apply_rotary_pos_emb`` for q [1, H, T, D], k [1, Hkv, T, D], cos/sin [1, T, D], in one kernel."""
    ok = ((q.is_cuda or _ON_CPU) and unsqueeze_dim == 1 and q.dim() == 4 and q.shape[0] == 1 and k.shape[0] == 1
          and cos.dim() == 3 and cos.shape[0] == 1 and cos.shape == sin.shape and cos.stride() == sin.stride()
          and q.dtype == k.dtype == cos.dtype and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
          and q.shape[-1] % 2 == 0 and cos.shape[-1] == q.shape[-1] and cos.shape[1] == q.shape[2])
    if not ok:
        return _original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    _, rope_kernel = _kernels()
    _, hq, t, d = q.shape
    hk = k.shape[1]
    # outputs laid out [1, T, H, D] (what the projections produced), viewed as [1, H, T, D]
    oq = torch.empty((1, t, hq, d), dtype=q.dtype, device=q.device)
    okk = torch.empty((1, t, hk, d), dtype=k.dtype, device=k.device)
    rope_kernel[(t, hq + hk)](q, k, cos, sin, oq, okk,
                              q.stride(1), q.stride(2), k.stride(1), k.stride(2), cos.stride(1),
                              oq.stride(1), oq.stride(2), okk.stride(1), okk.stride(2),
                              hq, HALF=d // 2, BLOCK=_pow2(d // 2), num_warps=1)
    return oq.transpose(1, 2), okk.transpose(1, 2)


_NORMS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def _targets(model: torch.nn.Module):
    found = _NORMS.get(model)
    if found is None:
        norms = [m for m in model.modules() if type(m).__name__ in NORM_CLASSES
                 and hasattr(m, "variance_epsilon") and isinstance(getattr(m, "weight", None), torch.Tensor)]
        mods = {sys.modules[type(m).__module__] for m in model.modules()
                if type(m).__name__ in ATTENTION_CLASSES}
        found = _NORMS[model] = [norms, [m for m in mods if callable(getattr(m, "apply_rotary_pos_emb", None))]]
    return found


#: process-wide switch, for benchmarks that measure what the fused kernels are worth
ENABLED = True


def available(device: torch.device) -> bool:
    if not ENABLED or torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@contextlib.contextmanager
def fused_ops(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Route the model's allowlisted RMSNorms and rotary to the fused kernels for the block."""
    if not enabled:
        yield
        return
    norms, modules = _targets(model)
    patched = [m for m in norms if "forward" not in m.__dict__]   # nested use: the outer one restores
    originals = []
    try:
        for m in patched:
            m.forward = functools.partial(rms_norm, m)
        for mod in modules:
            orig = mod.apply_rotary_pos_emb
            if getattr(orig, "_djinn_fused", False):
                continue
            originals.append((mod, orig))
            fused = functools.partial(apply_rotary, _original=orig)
            fused._djinn_fused = True
            mod.apply_rotary_pos_emb = fused
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
        for mod, orig in originals:
            mod.apply_rotary_pos_emb = orig
