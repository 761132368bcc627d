"""The engine's front-end hooks (on_token, logits_processor) and truncate, against transformers."""

from __future__ import annotations

import pytest
import torch

from djinn.engine import GenerateRequest
from djinn.errors import Cancelled, InvalidRequest

from tests.engine.test_generate import greedy, hf_greedy, make_engine


def test_on_token_sees_every_token_in_order(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        sid = eng.open_session("m")
        seen: list[int] = []
        out = eng.generate(sid, GenerateRequest(list(range(10, 30)), greedy(9), on_token=seen.append))
        assert seen == out.token_ids and len(seen) == 9
    finally:
        eng.shutdown()


def test_on_token_raising_rolls_the_turn_back(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        sid = eng.open_session("m")
        first = eng.generate(sid, GenerateRequest(list(range(10, 30)), greedy(4)))
        before = eng.session_info(sid)
        used = eng.stats()["kv_blocks"]["m"]["used"]

        def cancel_after_three(tok, n=[0]):
            n[0] += 1
            if n[0] == 3:
                raise Cancelled("client went away")

        with pytest.raises(Cancelled):
            eng.generate(sid, GenerateRequest(list(range(40, 60)), greedy(8), on_token=cancel_after_three))
        after = eng.session_info(sid)
        assert (after["tokens"], after["kv_tokens"], after["turns"]) == (before["tokens"], before["kv_tokens"], before["turns"])
        # the next turn continues from the last complete turn, as transformers would
        nxt = eng.generate(sid, GenerateRequest([7, 8, 9], greedy(5)))
        history = list(range(10, 30)) + first.token_ids + [7, 8, 9]
        assert nxt.token_ids == hf_greedy(tiny_llama.model, history, 5)
        assert eng.stats()["kv_blocks"]["m"]["used"] >= used
    finally:
        eng.shutdown()


def test_logits_processor_masks_before_sampling(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        sid = eng.open_session("m")
        forced = [33, 34, 35, 36]
        calls: list[list[int]] = []

        def force(out, logits):
            calls.append(list(out))
            masked = torch.full_like(logits, float("-inf"))
            masked[0, forced[len(out)]] = 0.0
            return masked

        out = eng.generate(sid, GenerateRequest(list(range(10, 20)), greedy(4), logits_processor=force))
        assert out.token_ids == forced
        assert calls == [forced[:i] for i in range(4)]
    finally:
        eng.shutdown()


def test_truncate_drops_kv_past_the_cut_and_continues_like_transformers(tiny_llama):
    eng = make_engine(tiny_llama)
    try:
        sid = eng.open_session("m")
        prompt = list(range(5, 45))                       # 40 tokens: 3 blocks of 16
        eng.generate(sid, GenerateRequest(prompt, greedy(6)))
        eng.truncate(sid, 18)
        info = eng.session_info(sid)
        assert (info["tokens"], info["kv_tokens"], info["kv_blocks"]) == (18, 18, 2)
        out = eng.generate(sid, GenerateRequest([50, 51, 52], greedy(5)))
        assert out.cached_tokens == 18
        assert out.token_ids == hf_greedy(tiny_llama.model, prompt[:18] + [50, 51, 52], 5)
        with pytest.raises(InvalidRequest):
            eng.truncate(sid, 10_000)
        with pytest.raises(InvalidRequest):
            eng.truncate(sid, -1)
        eng.truncate(sid, 0)
        assert eng.session_info(sid)["kv_blocks"] == 0
        assert eng.stats()["kv_blocks"]["m"]["used"] == 0
    finally:
        eng.shutdown()
