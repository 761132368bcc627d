"""Attention over the paged KV pool: the seam (base), the CPU reference, the GPU kernel."""

from djinn.attention.base import AttentionBackend, AttentionMetadata, SeqSpan, build_metadata
from djinn.attention.reference import ReferenceBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "SeqSpan", "build_metadata", "ReferenceBackend"]


def backend_for(device, name: str | None = None) -> AttentionBackend:
    """The attention backend for ``device``: ``name`` in (None, "reference", "triton").
    None picks the Triton paged kernel on CUDA when triton imports, else the reference."""
    import torch

    device = torch.device(device)
    if name not in (None, "reference", "triton"):
        raise ValueError(f"unknown attention backend {name!r}; use 'reference' or 'triton'")
    if name == "reference" or (name is None and device.type != "cuda"):
        return ReferenceBackend()
    from djinn.attention.triton_paged import TritonPagedBackend, triton_available

    if not triton_available():
        if name == "triton":
            raise RuntimeError("the triton attention backend needs the triton package")
        return ReferenceBackend()
    return TritonPagedBackend()


__all__.append("backend_for")
