"""A tiny continuous-batching driver for tests: sessions arrive at different steps, prefill in
chunks and decode greedily, all through ``Executor.forward_batch``. It is no scheduler; it
only makes every step a mix of prefill chunks and decodes of different lengths."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from djinn.engine.batch import BatchItem
from djinn.engine.executor import Executor
from djinn.engine.runtime import kv_geometry
from djinn.memory.blocks import BlockPool
from djinn.models.adapter import locate

# 1..300 tokens, with exact multiples of the block size (16, 32, 48, 256) and their neighbours
PROMPT_LENS = [1, 2, 5, 7, 15, 16, 17, 31, 32, 48, 63, 100, 129, 200, 256, 300]


def prompts_for(lm, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    hi = min(lm.config.vocab_size, 1000)
    return [torch.randint(3, hi, (n,), generator=g).tolist() for n in lens]


def make(lm, blocks: int = 0, block_size: int = 16):
    """An executor and a pool for ``lm`` (blocks: enough for the standard prompts by default)."""
    ex = Executor(lm.model, locate(lm.model))
    pool = BlockPool(kv_geometry(lm.config, block_size, lm.dtype), blocks or 400, lm.device)
    return ex, pool


@dataclass
class Seq:
    tokens: list[int]
    arrive: int
    cached: int = 0
    table: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)


def run_mixed(ex: Executor, pool: BlockPool, prompts: list[list[int]], new: int, chunk: int, arrive_every: int = 2,
              backend=None, graphs=None, on_step=None) -> list[list[int]]:
    """Greedy-generate ``new`` tokens for every prompt; session i joins at step i * arrive_every.
    ``on_step(step, seqs)`` runs before each step (tests move blocks there). Returns the tokens."""
    seqs = [Seq(list(p), i * arrive_every) for i, p in enumerate(prompts)]
    bs = pool.shape.block_size
    step = 0
    while any(len(s.out) < new for s in seqs):
        if on_step is not None:
            on_step(step, seqs)
        items, owners = [], []
        for s in seqs:
            if s.arrive > step or len(s.out) >= new:
                continue
            pending = s.tokens[s.cached:]
            n = min(chunk, len(pending))
            need = -(-(s.cached + n) // bs) - len(s.table)
            if need > 0:
                s.table.extend(pool.allocate(need))
            items.append(BatchItem(list(s.table), s.cached, pending[:n]))
            owners.append((s, n, n == len(pending)))
        if items:
            logits = ex.forward_batch(pool, items, backend=backend, graphs=graphs)
            for (s, n, done), lg in zip(owners, logits):
                s.cached += n
                if done:
                    t = int(lg[-1].argmax())
                    s.tokens.append(t)
                    s.out.append(t)
        step += 1
    for s in seqs:
        pool.release(s.table)
    return [s.out for s in seqs]


def move_blocks(pool: BlockPool, s: Seq) -> None:
    """Park-and-restore in miniature: copy a session's blocks to other physical blocks."""
    fresh = pool.allocate(len(s.table))
    old = torch.tensor(s.table, device=pool.device)
    pool.kv[torch.tensor(fresh, device=pool.device)] = pool.kv[old]
    pool.kv[old] = float("nan")          # any read of the old blocks would now poison the output
    pool.release(s.table)
    s.table = fresh
