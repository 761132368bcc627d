"""Everything the engine keeps per loaded model: weights, executor, KV pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from djinn.engine.executor import Executor
from djinn.memory.blocks import BlockPool, KVShape
from djinn.models.adapter import Architecture, locate


def kv_geometry(config, block_size: int, dtype: torch.dtype) -> KVShape:
    """KV shape from a transformers config (GQA-aware)."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVShape(num_layers=layers, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype)


def max_context(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@dataclass
class ModelRuntime:
    name: str
    loaded: object                # djinn.models.LoadedModel
    arch: Architecture
    executor: Executor
    kv: KVShape
    pool: BlockPool
    max_context: int

    @classmethod
    def build(cls, name: str, loaded, block_size: int, kv_blocks: int) -> "ModelRuntime":
        arch = locate(loaded.model)
        kv = kv_geometry(loaded.config, block_size, loaded.dtype)
        pool = BlockPool(kv, kv_blocks, loaded.device)
        return cls(name=name, loaded=loaded, arch=arch, executor=Executor(loaded.model, arch), kv=kv,
                   pool=pool, max_context=max_context(loaded.config))

    @staticmethod
    def block_bytes_for(loaded, block_size: int) -> int:
        return kv_geometry(loaded.config, block_size, loaded.dtype).block_bytes

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    def eos_ids(self) -> list[int]:
        eos = self.loaded.config.eos_token_id
        gen = getattr(self.loaded.model, "generation_config", None)
        if gen is not None and gen.eos_token_id is not None:
            eos = gen.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
