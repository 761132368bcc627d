"""Memory: budgets, the device KV block pool, weight streaming (host arena, device ring of slots,
copy engines) and (later) the KV pager."""

from djinn.memory.blocks import BlockPool, KVShape

__all__ = ["BlockPool", "KVShape"]
