"""The manual baselines of ``djinn bench resume``: what a user writes with plain transformers.

No Djinn code runs here except loading the same random-init weights (``djinn.models.load_model``
returns a plain transformers ``*ForCausalLM``). For one context length:

- recompute: ``model(history + [next])`` into a fresh ``DynamicCache``, one token out: the
  time to first token of a server that kept nothing;
- manual offload: prefill into a ``DynamicCache``, move every layer's keys and values to the
  CPU with ``.to("cpu")`` (``pageable``), or into page-locked buffers allocated up front with
  ``copy_(non_blocking=True)`` (``pinned``, CUDA only), then resume: copy each layer back with
  ``.to(device, non_blocking=True)`` and run one decode step. Timed: the copy back, the step,
  and their sum (the resume), each ending in a device synchronize.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from djinn.bench.common import median, sync


def _step(model, ids: torch.Tensor, cache: DynamicCache) -> int:
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return int(out.logits[0, -1].argmax())


def _layers(cache: DynamicCache) -> list:
    return list(cache.layers)


@torch.inference_mode()
def measure_context(model, history: list[int], repeat: int, device: torch.device) -> dict:
    """Recompute and manual offload (pageable, and pinned on CUDA) at ``len(history)`` tokens."""
    ids = torch.tensor([history], device=device)
    out: dict = {"tokens": len(history)}

    recompute = []
    for _ in range(repeat + 1):  # the first is a warm-up
        sync(device)
        t = time.perf_counter()
        cache = DynamicCache(config=model.config)
        nxt = _step(model, ids, cache)
        sync(device)
        recompute.append((time.perf_counter() - t) * 1e3)
        del cache
    out["recompute_ms"] = median(recompute[1:])
    out["recompute_all_ms"] = recompute[1:]

    cache = DynamicCache(config=model.config)
    nxt = _step(model, ids, cache)
    step_ids = torch.tensor([[nxt]], device=device)
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in _layers(cache))
    out["kv_bytes"] = kv_bytes
    device_kv = [(layer.keys, layer.values) for layer in _layers(cache)]
    variants = ["pageable"] + (["pinned"] if device.type == "cuda" else [])
    for variant in variants:
        sync(device)
        t = time.perf_counter()
        if variant == "pinned":
            host = []
            for k, v in device_kv:
                hk = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
                hv = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                host.append((hk, hv))
            alloc_ms = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            for (hk, hv), (k, v) in zip(host, device_kv):
                hk.copy_(k, non_blocking=True)
                hv.copy_(v, non_blocking=True)
        else:
            alloc_ms = 0.0
            host = [(k.to("cpu"), v.to("cpu")) for k, v in device_kv]
        sync(device)
        offload_ms = (time.perf_counter() - t) * 1e3
        h2d, steps, total = [], [], []
        for _ in range(repeat + 1):
            sync(device)
            t = time.perf_counter()
            for layer, (hk, hv) in zip(_layers(cache), host):
                layer.keys = hk.to(device, non_blocking=True)
                layer.values = hv.to(device, non_blocking=True)
            sync(device)
            t1 = time.perf_counter()
            _step(model, step_ids, cache)   # appends one token: the next repeat puts the cache back
            sync(device)
            t2 = time.perf_counter()
            h2d.append((t1 - t) * 1e3)
            steps.append((t2 - t1) * 1e3)
            total.append((t2 - t) * 1e3)
        out[f"offload_{variant}"] = {
            "offload_ms": offload_ms, "host_alloc_ms": alloc_ms, "h2d_ms": median(h2d[1:]),
            "step_ms": median(steps[1:]), "resume_ms": median(total[1:]), "resume_all_ms": total[1:],
            "h2d_gb_per_s": kv_bytes / (median(h2d[1:]) * 1e-3) / 1e9 if median(h2d[1:]) > 0 else None,
        }
        del host
    if device.type != "cuda":
        out["offload_pinned"] = None
        out["offload_pinned_note"] = "pinned host memory needs CUDA"
    del cache, device_kv
    return out
