"""Memory: budgets, the device KV block pool, the KV host arena (``memory.host``), the pager that
moves KV blocks between them, the policies that decide whose KV moves, and weight streaming
(``memory.streaming``: its own host arena, a device ring of slots, copy engines)."""

from djinn.memory.blocks import BlockPool, KVShape
from djinn.memory.host import HostArena
from djinn.memory.pager import Pager, Transfer
from djinn.memory.policy import Action, Candidate, KVState, Policy, make_policy

__all__ = ["BlockPool", "KVShape", "HostArena", "Pager", "Transfer", "Action", "Candidate", "KVState", "Policy",
           "make_policy"]
