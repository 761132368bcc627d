"""Everything the engine keeps per loaded model: weights, executor, KV pool, weight streamer.

A model loaded with its decoder layers in a host arena (``loaded.arena``) gets a
``WeightStreamer`` as its executor's layer source; its device weight cost is then the resident
parts plus the streamer's ring of slots, not the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from djinn.config import MemoryConfig
from djinn.engine.executor import Executor
from djinn.memory.blocks import BlockPool, KVShape
from djinn.memory.budget import stream_chunk, stream_slots
from djinn.memory.streaming import WeightStreamer
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
    streamer: WeightStreamer | None = None

    @classmethod
    def build(cls, name: str, loaded, block_size: int, kv_blocks: int,
              memory: MemoryConfig | None = None) -> "ModelRuntime":
        arch = locate(loaded.model)
        kv = kv_geometry(loaded.config, block_size, loaded.dtype)
        streamer = None
        if loaded.arena is not None:
            streamer = WeightStreamer(loaded.arena, loaded.device, cls.stream_slots_for(loaded, memory),
                                      stream_chunk(memory))
        pool = BlockPool(kv, kv_blocks, loaded.device)
        return cls(name=name, loaded=loaded, arch=arch, executor=Executor(loaded.model, arch, layer_source=streamer),
                   kv=kv, pool=pool, max_context=max_context(loaded.config), streamer=streamer)

    @staticmethod
    def stream_slots_for(loaded, memory: MemoryConfig | None) -> int:
        """Ring slots a streamed model gets: as configured, or the default that fits its budget
        (counted for this model alone; with several models the plan says whether all fit)."""
        slots = stream_slots(memory, loaded.device, loaded.weight_bytes(resident_only=True),
                             loaded.arena.max_layer_bytes)
        return min(slots, loaded.arena.num_layers)

    @classmethod
    def device_weight_bytes_for(cls, loaded, memory: MemoryConfig | None) -> int:
        """What ``loaded``'s weights will take on the device once built with ``memory``."""
        if loaded.arena is None:
            return loaded.weight_bytes()
        return loaded.weight_bytes(resident_only=True) + cls.stream_slots_for(loaded, memory) * loaded.arena.max_layer_bytes

    @property
    def device_weight_bytes(self) -> int:
        if self.streamer is None:
            return self.loaded.weight_bytes()
        return self.loaded.weight_bytes(resident_only=True) + self.streamer.device_bytes

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
