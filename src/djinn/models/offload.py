"""Models whose decoder layers live in a host arena (for weight streaming).

Owns putting a model's decoder-layer parameters into a ``HostArena`` (djinn.memory.streaming)
while everything else (embeddings, norms, head, every buffer) goes to the device. The decoder
layers are never all on the device at once:

- random-init presets are built on the meta device; each decoder layer in turn is
  materialised on the device, initialised, copied into the arena and released. The walk over
  modules is transformers' own ``initialize_weights`` order (children first, each sub-model
  with its own ``_initialize_weights``), so the device's generator is drawn from in exactly
  the order a resident build draws: same preset + seed + device + dtype => the same weights as
  ``build_random``, bit for bit (tested);
- loaded checkpoints (a local directory, GGUF) are read into host memory by transformers,
  then moved layer by layer into the arena; the rest goes to the device.

Everything left uninitialised is caught (NaN-filled first, checked after), as in loading.py.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

from djinn.errors import InvalidRequest, UnsupportedModel
from djinn.memory.streaming import HostArena
from djinn.models.adapter import locate

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (tied tensors once); works on the meta device."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _to_device_except(model: nn.Module, skip: set[int], device: torch.device) -> None:
    """Move every parameter not in a module of ``skip`` (ids) and every buffer to ``device``,
    keeping ties (one tensor held by two modules stays one tensor)."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if id(module) not in skip:
            for name, p in module._parameters.items():
                if p is not None:
                    if id(p) not in moved:
                        moved[id(p)] = nn.Parameter(p.detach().to(device), requires_grad=False)
                    module._parameters[name] = moved[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)


def _check_finite(tensors: list[tuple[str, torch.Tensor]], what: str) -> None:
    missed = [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if missed:
        raise UnsupportedModel(f"{what}: transformers' init left {len(missed)} tensors uninitialised "
                               f"(e.g. {missed[0]})")


def _fill_nan(module: nn.Module, recurse: bool) -> None:
    with torch.no_grad():
        for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
            if t.is_floating_point():
                t.fill_(float("nan"))


def _init_walk(model: PreTrainedModel, enter: Callable[[nn.Module], None], leave: Callable[[nn.Module], None]) -> None:
    """``model.init_weights()`` with ``enter``/``leave`` called around every module's subtree.

    Mirrors transformers 5.17's ``initialize_weights`` (``smart_apply``: children first, then
    the module; a ``PreTrainedModel`` child dispatches its own ``_initialize_weights``), then
    ties weights like ``init_weights`` does."""
    custom = model.is_custom_code()

    def visit(module: nn.Module, fn) -> None:
        enter(module)
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        fn(module, custom)
        leave(module)

    with torch.no_grad(), hf_init.guard_torch_init_functions():
        visit(model, model._initialize_weights)
    model.tie_weights(recompute_mapping=False)


def _streamed(model: nn.Module, resident_layers: int) -> list[nn.Module]:
    """The decoder layers that go to the arena: all but the first ``resident_layers``."""
    layers = list(locate(model).layers)
    if not isinstance(resident_layers, int) or not 0 <= resident_layers < len(layers):
        raise InvalidRequest(f"resident decoder layers must be a whole number in [0, {len(layers)}) for this model "
                             f"({len(layers)} layers), got {resident_layers!r}")
    return layers[resident_layers:]


def build_random_offloaded(config: PretrainedConfig, *, device: torch.device, dtype: torch.dtype, seed: int,
                           seeded, log: Log | None = None, resident_layers: int = 0) -> tuple[nn.Module, HostArena]:
    """A random-init ``*ForCausalLM`` whose decoder layers (but the first ``resident_layers``) live
    in a new host arena. ``seeded(seed, device)``: seeds the device's generator (loading._seeded)."""
    log = log or _quiet
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    layers = _streamed(model, resident_layers)
    layer_of = {id(layer): k for k, layer in enumerate(layers)}
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    arena = _new_arena(layers, device, log, first=resident_layers)
    for module in model.modules():
        if id(module) not in in_layers:
            module.to_empty(device=device, recurse=False)
            _fill_nan(module, recurse=False)
    started = time.perf_counter()

    def enter(module: nn.Module) -> None:
        k = layer_of.get(id(module))
        if k is not None:  # this layer alone on the device, NaN until transformers' init fills it
            module.to_empty(device=device)
            _fill_nan(module, recurse=True)

    def leave(module: nn.Module) -> None:
        k = layer_of.get(id(module))
        if k is None:
            return
        _check_finite(list(module.named_parameters()) + list(module.named_buffers()), f"decoder layer {k}")
        arena.place(k)
        if k % 8 == 7 or k == len(layers) - 1:
            log(f"  initialised {k + 1}/{len(layers)} streamed decoder layers into the arena "
                f"({time.perf_counter() - started:.1f} s)")

    with seeded(seed, device):
        _init_walk(model, enter, leave)
    _check_finite([(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if not arena.contains(t)],
                  type(model).__name__)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the one-layer staging memory goes back
    return model, arena


def offload_loaded(model: nn.Module, device: torch.device, log: Log | None = None,
                   resident_layers: int = 0) -> HostArena:
    """Move a model held in host memory (fresh from ``from_pretrained``) into the streamed layout:
    decoder layers (but the first ``resident_layers``) into a new arena, layer by layer; everything
    else onto ``device``."""
    log = log or _quiet
    layers = _streamed(model, resident_layers)
    arena = _new_arena(layers, device, log, first=resident_layers)
    for k in range(len(layers)):
        arena.place(k)
    _to_device_except(model, {id(m) for layer in layers for m in layer.modules()}, device)
    return arena


def _new_arena(layers: list[nn.Module], device: torch.device, log: Log, first: int) -> HostArena:
    pin = device.type == "cuda"   # pinning needs CUDA; on CPU the "device" ring is RAM as well
    started = time.perf_counter()
    nbytes = sum(param_bytes(layer) for layer in layers)
    log(f"  allocating a {'pinned ' if pin else ''}host arena for {len(layers)} decoder layers "
        f"({nbytes / 2**30:.2f} GiB)...")
    arena = HostArena(layers, range(first, first + len(layers)), pin=pin)
    log(f"  arena ready in {time.perf_counter() - started:.1f} s")
    return arena
