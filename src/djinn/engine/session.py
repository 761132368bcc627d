"""The unit of state: one session's token history, KV block table and phase.

Invariant: the KV of ``tokens[:num_cached]`` is stored in ``block_table`` (in order, one block
per ``block_size`` tokens); the tokens after ``num_cached`` (at most the last sampled one,
between turns) have not been through the model yet.

Where that KV is (``kv_state``) is managed by ``engine.residency``: on the device in
``block_table``; parked in host blocks ``host_table``; moving; or dropped (``num_cached == 0``,
``block_table`` empty, ``rebuild_to`` = the old ``num_cached``: before its next forward the
engine recomputes that prefix from ``tokens``, which are always kept, with no hooks).
A restore puts the KV back into ``block_table`` *in place* (the same list object, possibly other
physical blocks) and increments ``kv_epoch``: anything that captured block ids (a paused
forward's ``PagedCache``) must rebuild itself when ``kv_epoch`` changed.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field

from djinn.memory.policy import KVState


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
    # -- residency (engine.residency owns these; read them under its lock) --
    kv_state: KVState = KVState.DEVICE
    host_table: list[int] = field(default_factory=list)   # host arena blocks while parked
    kv_epoch: int = 0                                     # bumped whenever block_table's blocks change place
    busy: bool = False                                    # a turn is running: never moved meanwhile
    admitting: bool = False                               # its turn waits for its restore (engine/admission.py)
    phase_since: float = field(default_factory=time.monotonic)
    wait_ema: float | None = None                         # its IO_WAITs' weighted mean length (s)
    wait_dev: float | None = None                         # ... and their weighted mean deviation (s)
    wait_plan: object = field(default=None, repr=False)   # the policy's plan for the current IO_WAIT
    move: object = field(default=None, repr=False)        # the copy in flight, if any
    prefetch_wanted: bool = False                         # ACTIVE came while the device had no room yet
    rebuild_to: int = 0                                   # dropped: tokens[:rebuild_to] had KV; recompute them first
    kv_ready: object = field(default=None, repr=False)    # CUDA event: the last compute that wrote its KV
    kv_clean_to: int = 1 << 62                            # KV from this position on was computed with an
                                                          # intervention that changes K/V: never shared (memory.prefix)

    @property
    def pinned(self) -> bool:
        """A turn runs on it or waits for its restore: no policy moves its KV meanwhile."""
        return self.busy or self.admitting

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def touch(self) -> None:
        self.last_used = time.monotonic()
