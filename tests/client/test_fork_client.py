"""``Session.fork()`` through the public API, embedded and remote (tests/client/conftest.py).

Oracles: transformers' own generate, and a forward hook written here, on the same weights."""

from __future__ import annotations

import torch

import djinn
from tests.client.conftest import MODEL, oracle_model
from tests.client.test_api import hf_greedy

IDS = list(range(40, 77))


def test_a_fork_continues_like_an_independent_session_and_leaves_the_parent_alone(client):
    model = oracle_model(client)
    with client.model(MODEL).session() as parent:
        first = parent.generate(IDS, max_new_tokens=2, chat=False, ignore_eos=True).token_ids
        history = IDS + first
        child = parent.fork()
        assert isinstance(child, djinn.Session) and child.id != parent.id and child.paused is None
        assert child.info()["tokens"] == len(history)
        assert client.stats()["sharing"]["shared_blocks"] >= 1
        out = child.generate([5], max_new_tokens=4, chat=False, ignore_eos=True).token_ids
        assert out == hf_greedy(model, history + [5], 4)
        out = parent.generate([6], max_new_tokens=4, chat=False, ignore_eos=True).token_ids
        assert out == hf_greedy(model, history + [6], 4)
        child.close()


def test_a_paused_session_forks_into_two_counterfactuals(client):
    model = oracle_model(client)
    refs = []
    for factor in (0.9, -0.5):
        handle = model.model.layers[1].register_forward_hook(lambda m, a, out, f=factor: out * f)
        try:
            with torch.inference_mode():
                refs.append(model(torch.tensor([IDS])).logits[0])
        finally:
            handle.remove()
    with client.model(MODEL).session() as parent:
        p = parent.forward(IDS, breakpoint=1)
        child = parent.fork()
        assert isinstance(child.paused, djinn.Paused) and (child.paused.layer, child.paused.step) == (1, 0)
        r2 = child.paused.resume(child.paused.activation * -0.5)
        r1 = p.resume(p.activation * 0.9)
        assert torch.equal(r1.logits.fetch(), refs[0])
        assert torch.equal(r2.logits.fetch(), refs[1])
        child.close()
