"""Memory: budgets, the device KV block pool and (later) the pinned host arena and pager."""

from djinn.memory.blocks import BlockPool, KVShape

__all__ = ["BlockPool", "KVShape"]
