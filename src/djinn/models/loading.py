"""Turning a model name into a ready ``LoadedModel``.

Owns weight materialisation. Whatever the source, a ``LoadedModel`` holds a transformers
``*ForCausalLM`` in eval mode with ``requires_grad`` off, every tensor on ``device``, and
a tokenizer (never None).

Random-init presets are built on the meta device and materialised directly on the target
device, so a 13B shape never needs a host copy. Initialisation is transformers' own
(``init_weights``): it also recomputes non-persistent buffers such as rotary ``inv_freq``,
which ``to_empty`` leaves as garbage, and re-ties tied embeddings. Invariants:

- same preset + seed + device + dtype => bitwise identical weights;
- the caller's RNG state is left as it was;
- no tensor is left uninitialised (checked: everything is filled with NaN first).

With ``offload`` the decoder layers' parameters go into a host arena instead of onto the
device (models/offload.py); ``LoadedModel.arena`` then holds them and the engine streams them
(djinn.memory.streaming). Every other tensor is on ``device`` as always.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from djinn.errors import InvalidRequest, UnsupportedModel
from djinn.models import registry
from djinn.models.tokenizer import byte_tokenizer, fix_special_tokens


@dataclass
class LoadedModel:
    """A model ready to run. Cheap to print: the module tree is left out of ``repr``."""

    name: str                  # what the user asked for: a preset, a cached name, or a path
    model: torch.nn.Module = field(repr=False)
    tokenizer: Any = field(repr=False)
    config: Any = field(repr=False)
    device: torch.device
    dtype: torch.dtype
    is_chat: bool              # the tokenizer carries a chat template meant for chat
    source: str                # "preset" | "cache" | "local-dir" | "gguf"
    arena: Any = field(default=None, repr=False)   # HostArena of streamed decoder layers, or None

    def weight_bytes(self, *, resident_only: bool = False) -> int:
        """Bytes of all parameters and buffers; tensors sharing memory (tied) count once.
        ``resident_only``: leave out what lives in the host arena (what the device holds)."""
        seen: set[int] = set()
        total = 0
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            ptr = tensor.data_ptr()
            if ptr in seen or (resident_only and self.arena is not None and self.arena.contains(tensor)):
                continue
            seen.add(ptr)
            total += tensor.numel() * tensor.element_size()
        return total

    @property
    def streamed(self) -> bool:
        return self.arena is not None


def resolve_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """None means float32 on CPU and float16 on an accelerator."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidRequest(f"dtype must be a floating torch.dtype (float32, float16, bfloat16), got {dtype!r}")
    return dtype


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars on or off for the block."""
    # transformers only has a process-wide switch; restore whatever was set before.
    was_disabled = hf_logging.is_progress_bar_enabled() is False
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        (hf_logging.disable_progress_bar if was_disabled else hf_logging.enable_progress_bar)()


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed only the generators ``device`` draws from (``torch.manual_seed`` would reseed
    every GPU), and give the caller's states back afterwards."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def build_random(config: PretrainedConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``*ForCausalLM`` for ``config``, built straight on ``device``."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device=device)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
        with _seeded(seed, device):
            model.init_weights()
        missed = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                  if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if missed:
        raise UnsupportedModel(f"{type(model).__name__}: transformers' init left {len(missed)} tensors "
                               f"uninitialised after meta-device construction (e.g. {missed[0]})")
    return model


def _from_pretrained(directory: Path, *, dtype: torch.dtype, gguf_file: str | None) -> torch.nn.Module:
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": None}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        try:
            return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as exc:
            if "sdpa" not in str(exc).lower():
                raise
            return AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as exc:
        where = directory / gguf_file if gguf_file else directory
        raise UnsupportedModel(f"cannot load {where} as a causal language model: {exc}") from exc


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """Forget that weights came from a quantized GGUF: they are dequantized on load, and a
    model still marked quantized refuses ``save_pretrained`` and some moves."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _load_local(ref: registry.ModelRef, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    assert ref.path is not None
    if ref.source == registry.SOURCE_GGUF:
        directory, gguf_file = ref.path.parent, ref.path.name
        model = plain_model(_from_pretrained(directory, dtype=dtype, gguf_file=gguf_file))
    else:
        directory, gguf_file = ref.path, None
        model = _from_pretrained(directory, dtype=dtype, gguf_file=None)
    missing = UnsupportedModel(f"{ref.path} has no tokenizer transformers can load (a model directory needs "
                               "tokenizer.json and tokenizer_config.json next to the weights)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, KeyError) as exc:
        raise missing from exc
    if tokenizer is None or isinstance(tokenizer, bool):
        raise missing
    fix_special_tokens(tokenizer, model.config)
    return model, tokenizer


def load_model(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    home: Path,
    seed: int = 0,
    progress: bool = True,
    offload: bool | Callable[[int], bool] = False,
    resident_layers: int = 0,
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load ``name`` (a preset, a cached model, a model directory or a .gguf file) onto
    ``device``. ``seed`` only matters for presets. Raises ModelNotFound / UnsupportedModel.

    ``offload``: keep the decoder layers in a host arena for streaming; True, False, or a
    function of the model's weight bytes that decides (e.g. "they don't fit the budget");
    ``resident_layers``: with offload, keep the first this many decoder layers on the device.
    ``log``: where to report the progress of an offloaded build (it takes a while for 13B)."""
    from djinn.models import offload as off

    device = torch.device(device)
    dtype = resolve_dtype(device, dtype)
    ref = registry.resolve(name, home)
    arena = None
    if ref.source == registry.SOURCE_PRESET:
        assert ref.preset is not None
        config = ref.preset.make_config()
        if _decide(offload, lambda: _meta_bytes(config, dtype)):
            model, arena = off.build_random_offloaded(config, device=device, dtype=dtype, seed=seed,
                                                      seeded=_seeded, log=log, resident_layers=resident_layers)
        else:
            model = build_random(config, device=device, dtype=dtype, seed=seed)
        tokenizer, is_chat = byte_tokenizer(), False
    else:
        with progress_bars(progress):
            model, tokenizer = _load_local(ref, dtype)
        if _decide(offload, lambda: off.param_bytes(model)):
            arena = off.offload_loaded(model, device, log=log, resident_layers=resident_layers)
        else:
            model.to(device)
        is_chat = getattr(tokenizer, "chat_template", None) is not None
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, config=model.config, device=device,
                       dtype=dtype, is_chat=is_chat, source=ref.source, arena=arena)


def _meta_bytes(config: PretrainedConfig, dtype: torch.dtype) -> int:
    from djinn.models.offload import param_bytes

    with torch.device("meta"):
        return param_bytes(AutoModelForCausalLM.from_config(config, dtype=dtype))


def _decide(offload: bool | Callable[[int], bool], weight_bytes: Callable[[], int]) -> bool:
    if isinstance(offload, bool):
        return offload
    if callable(offload):
        return bool(offload(weight_bytes()))
    raise InvalidRequest(f"offload must be True, False or a function of the weight bytes, got {offload!r}")
