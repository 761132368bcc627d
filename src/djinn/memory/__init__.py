"""Memory: budgets, the device KV block pool, the pinned host arena, the pager that moves blocks
between them, and the policies that decide whose KV moves."""

from djinn.memory.blocks import BlockPool, KVShape
from djinn.memory.host import HostArena
from djinn.memory.pager import Pager, Transfer
from djinn.memory.policy import Action, Candidate, KVState, Policy, make_policy

__all__ = ["BlockPool", "KVShape", "HostArena", "Pager", "Transfer", "Action", "Candidate", "KVState", "Policy",
           "make_policy"]
