"""The unit of state: one session's token history, KV block table and phase.

Invariant: the KV of ``tokens[:num_cached]`` is stored in ``block_table`` (in order, one block
per ``block_size`` tokens); the tokens after ``num_cached`` (at most the last sampled one,
between turns) have not been through the model yet.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field


class Phase(str, enum.Enum):
    ACTIVE = "ACTIVE"        # may run; KV on the device
    IO_WAIT = "IO_WAIT"      # the client is running a tool; KV may leave the device
    PAUSED = "PAUSED"        # stopped at a breakpoint, waiting for resume
    CLOSED = "CLOSED"


@dataclass
class Session:
    model: str
    owner: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tokens: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    phase: Phase = Phase.ACTIVE
    messages: list[dict] = field(default_factory=list)   # chat turns, to render the next turn's template
    ended_with_eos: bool = False                          # did the last turn end on an end-of-turn token
    created_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    turns: int = 0
    tokens_computed: int = 0                              # tokens that went through the model, all turns

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def touch(self) -> None:
        self.last_used = time.monotonic()
