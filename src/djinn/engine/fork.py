"""``fork()``: a new session with a session's token history and KV, sharing its blocks.

The child gets the parent's tokens, chat history and KV, wherever that KV is, in time
independent of the history's length and without copying it (``Residency.fork``):

- on the device: the child's block table lists the parent's blocks, each with one more
  reference; a block is copied only when one of its sessions writes into it (the partly
  filled last block on the next turn, or the block a truncation cut: ``Residency.grow``);
- parked on the host: the child is parked too and shares the host blocks; each sharer's
  restore makes its own device copy (sharing is not kept across a park/restore);
- dropped: the child is dropped too and recomputes the same prefix on its first turn;
- moving: the copy in flight is waited for first.

A session paused at a breakpoint forks paused at the same point: the child gets its own
step (engine/whitebox_step.py: over its own blocks, with its own copy of the activation)
and, inside a generation, its own copy of the turn (tokens so far, interventions, captures,
the sampler's random state), so each resumes independently: ``p1.resume(a * 0.9)`` and
``p2.resume(a + v)`` explore two counterfactuals from one prefix. The in-flight forward has
already written layers ``0..N`` of its new tokens into the blocks it covers, so those blocks are
copied for the child rather than shared (the parent's resume writes the remaining layers).

Runs on the engine loop (``Engine.fork``). On error nothing changes: the parent is untouched
and the child never existed.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch

from djinn.engine.session import Session
from djinn.errors import CapacityError, InvalidRequest

if TYPE_CHECKING:  # pragma: no cover
    from djinn.engine.engine import Engine
    from djinn.engine.whitebox import PausedForward


@torch.inference_mode()
def fork_session(engine: "Engine", session_id: str, owner: str | None) -> dict:
    """Fork ``session_id``: ``{"session_id": child id, "paused": the child's paused_ref or None}``."""
    parent = engine._session(session_id, owner)
    if parent.busy:
        raise InvalidRequest("a turn is running on this session; fork it when the turn has ended")
    if len(engine.sessions) >= engine.config.max_sessions:
        raise CapacityError(f"too many sessions ({engine.config.max_sessions}); close some before forking")
    rt = engine.runtime(parent.model)
    wb = engine.whitebox
    pid = wb.paused_of(parent.id)
    p = wb.paused[pid] if pid is not None else None
    child = Session(model=parent.model, owner=parent.owner, tokens=list(parent.tokens),
                    messages=[dict(m) for m in parent.messages], ended_with_eos=parent.ended_with_eos,
                    turns=parent.turns)
    inflight = p.state.num_tokens if p is not None else 0
    engine.residency.fork(parent, child, inflight)       # registers the child with the residency
    engine.sessions[child.id] = child
    try:
        paused = _fork_paused(engine, rt, p, parent, child) if p is not None else None
    except BaseException:
        del engine.sessions[child.id]
        wb.on_close(child)
        engine.residency.release(child)
        raise
    return {"session_id": child.id, "paused": paused}


def _fork_paused(engine: "Engine", rt, p: "PausedForward", parent: Session, child: Session) -> dict:
    """Pause ``child`` where ``parent`` is paused, with state of its own."""
    wb = engine.whitebox
    st = p.state
    hook, turn = st.hook, None
    if p.turn is not None:
        turn = _copy_turn(p.turn, child)
        hook = turn.plan.hook(st.start, st.num_tokens)
    # (a paused forward()'s hook has no captures: it only reads its interventions, so it is shared)
    act = wb.store.get(p.activation_id, parent.id)
    # a parked child has no device blocks yet: the parent's (stale) ids stand in, and the
    # child's resume rebinds its step to wherever its KV is restored
    state = st.fork(child.block_table or None, act.clone().unsqueeze(0), hook)
    child.phase = p.prev_phase
    return wb.pause(child, state, p.layer, p.step, new_tokens=p.new_tokens, blocks_before=p.blocks_before,
                    turn=turn)


def _copy_turn(wt, child: Session):
    """A paused generation's ``WhiteboxTurn`` for ``child``: the same progress, nothing shared
    that either side changes later (tokens, captures, the sampler's generator)."""
    t = wt.turn
    new = copy.copy(wt)
    new.turn = dataclasses.replace(t, session=child, new_tokens=list(t.new_tokens),
                                   new_msgs=[dict(m) for m in t.new_msgs], memory=dict(t.memory))
    new.s = child
    new.out = list(wt.out)
    new.plan = copy.copy(wt.plan)
    new.plan.captured = {layer: list(chunks) for layer, chunks in wt.plan.captured.items()}
    new.sampler = copy.copy(wt.sampler)
    gen = wt.sampler.generator
    if gen is not None:
        new.sampler.generator = torch.Generator(device=gen.device)
        new.sampler.generator.set_state(gen.get_state())
    return new
