"""Tensor codec: a closed set of dtypes, raw little-endian bytes, no object serialisation.

A tensor crosses the wire as a descriptor in the header, ``{"dtype": str, "shape": [int],
"nbytes": int}``, plus its raw bytes in the payload. The payload is the tensors' bytes in
descriptor order, each one starting at a multiple of :data:`PAYLOAD_ALIGN` bytes (zero
padding in between), so that a receiver whose buffer is aligned can view every tensor in
place.

Copies (the invariant the frame layer relies on):
- encoding (:func:`tensor_buffer`) of a contiguous CPU tensor is a ``memoryview`` of its
  own memory: no copy. A non-contiguous tensor is made contiguous (one copy), a device
  tensor is moved to the CPU (one copy); both are the caller's cost, stated here.
- decoding (:func:`tensor_from_payload`) is a zero-copy ``torch.frombuffer`` view of the
  payload buffer, which the frame layer always allocates writable (``frames.payload_buffer``),
  so the tensor is writable and keeps the buffer alive. It copies only when the tensor's
  address is not a multiple of its item size (cannot happen with our padding and malloc's
  16-byte alignment, but is checked rather than assumed).

bfloat16 travels as its raw 2-byte bits; bool as one byte that must be 0 or 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from djinn.errors import ProtocolError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_NDIM = 8
MAX_TENSORS = 1024  # per message; also keeps sendmsg's iovec count bounded
PAYLOAD_ALIGN = 8  # the largest item size in DTYPES
_DESC_KEYS = frozenset(("dtype", "shape", "nbytes"))


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype, or ProtocolError naming the allowed ones."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(
            f"dtype {dtype} cannot be sent; allowed: {', '.join(DTYPES)} (convert with .to(...))"
        ) from None


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to the payload alignment."""
    return -(-nbytes // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


def prepare_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU, contiguous, plain (no autograd, conj or neg bit) tensor with the same values.

    Returns ``tensor`` itself when it already is one (the common case: no copy)."""
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"expected a torch.Tensor to send, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise ProtocolError(f"only dense tensors can be sent, got layout {tensor.layout}")
    dtype_name(tensor.dtype)
    if tensor.dim() > MAX_NDIM:
        raise ProtocolError(f"tensor has {tensor.dim()} dimensions; at most {MAX_NDIM} can be sent")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def describe(tensor: torch.Tensor) -> dict[str, Any]:
    """The header descriptor of a prepared tensor."""
    return {
        "dtype": DTYPE_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
        "nbytes": tensor.numel() * tensor.element_size(),
    }


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a prepared tensor as a memoryview of its own memory (no copy).

    The view keeps the tensor alive; writing to the tensor while the view is being sent
    changes what is sent."""
    flat = tensor.reshape(-1)  # a view: the tensor is contiguous
    # numpy has no bfloat16, so view every dtype as bytes first; bool is one byte already
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def check_descriptor(desc: Any, index: int, max_bytes: int) -> tuple[torch.dtype, tuple[int, ...], int]:
    """Validate one header descriptor; returns (dtype, shape, nbytes) or raises ProtocolError."""
    where = f"tensors[{index}]"
    if not isinstance(desc, dict):
        raise ProtocolError(f"{where}: a tensor descriptor must be a map, got {type(desc).__name__}")
    keys = set(desc)
    if keys != _DESC_KEYS:
        extra, missing = sorted(map(str, keys - _DESC_KEYS)), sorted(_DESC_KEYS - keys)
        raise ProtocolError(f"{where}: descriptor fields must be dtype, shape, nbytes "
                            f"(missing {missing}, unknown {extra})")
    name, shape, nbytes = desc["dtype"], desc["shape"], desc["nbytes"]
    if not isinstance(name, str) or name not in DTYPES:
        raise ProtocolError(f"{where}: unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ProtocolError(f"{where}: shape must be a list of at most {MAX_NDIM} sizes, got {shape!r:.80}")
    for d in shape:
        if type(d) is not int or d < 0:
            raise ProtocolError(f"{where}: shape {shape!r} has a size that is not a non-negative int")
    if type(nbytes) is not int or nbytes < 0:
        raise ProtocolError(f"{where}: nbytes must be a non-negative int, got {nbytes!r}")
    dtype = DTYPES[name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize  # Python ints: cannot overflow
    if nbytes != expected:
        raise ProtocolError(f"{where}: nbytes={nbytes} but shape {shape} of {name} needs {expected}")
    if nbytes > max_bytes:
        raise ProtocolError(f"{where}: {nbytes} bytes exceeds the message limit of {max_bytes}")
    return dtype, tuple(shape), nbytes


def tensor_from_payload(payload: bytearray | memoryview, offset: int, dtype: torch.dtype,
                        shape: tuple[int, ...], nbytes: int, index: int = 0) -> torch.Tensor:
    """View ``nbytes`` of ``payload`` at ``offset`` as a tensor (zero-copy when aligned)."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(payload, dtype=torch.uint8, count=nbytes, offset=offset)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if raw.data_ptr() % itemsize:
        raw = raw.clone()  # misaligned for this dtype: copy into a fresh (aligned) allocation
    if dtype == torch.bool and bool((raw > 1).any()):
        raise ProtocolError(f"tensors[{index}]: bool tensor holds bytes other than 0 and 1")
    return raw.view(dtype).reshape(shape)
