"""The public client API, run against the embedded client and a real ``djinn serve``
(tests/client/conftest.py). Oracles: transformers' own ``generate`` and modules on the
same weights, and the tokenizer/config the server itself loaded."""

from __future__ import annotations

import pytest
import torch

import djinn
from tests.client.conftest import MODEL, is_remote, oracle_model
from tests.conftest import loaded


def hf_greedy(model, history: list[int], n: int) -> list[int]:
    ids = torch.tensor([history])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(history):].tolist()


@pytest.fixture
def sess(client):
    s = client.model(MODEL).session()
    yield s
    s.close()


def test_greedy_turns_continue_the_server_resident_session(client, sess):
    model = oracle_model(client)
    history: list[int] = []
    for turn, prompt in enumerate([list(range(30, 37)), list(range(60, 76)), [5, 6, 7]]):
        out = sess.generate(prompt, max_new_tokens=6, ignore_eos=True)
        history += prompt
        assert out.token_ids == hf_greedy(model, history, 6), f"turn {turn}"
        assert out.finish_reason == "length" and out.session_id == sess.id
        if turn:   # only the new tokens (and the previous turn's last sampled one) are computed
            assert out.cached_tokens == len(history) - len(prompt) - 1
            assert out.computed_tokens == len(prompt) + 1 + 5
        assert out.timings["total_ms"] >= out.timings["queue_ms"] >= 0
        history += out.token_ids
    info = sess.info()
    assert info["tokens"] == len(history) and info["phase"] == "ACTIVE" and info["model"] == MODEL


def test_text_in_text_out_and_seeded_sampling(client):
    m = client.model(MODEL)
    with m.session() as a, m.session() as b:
        kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
        x, y = a.generate("hello there", **kw), b.generate("hello there", **kw)
        assert x.token_ids == y.token_ids and len(x.token_ids) == 10
        assert x.text == m.tokenizer.decode(x.token_ids, skip_special_tokens=True)
        assert x.prompt_tokens == len(m.tokenizer.encode("hello there"))


def test_stop_token_ids_and_stop_strings(client):
    m = client.model(MODEL)
    with m.session() as s:
        ref = s.generate([9, 8, 7], max_new_tokens=10, ignore_eos=True)
    stop_id = ref.token_ids[3]
    with m.session() as s:
        out = s.generate([9, 8, 7], max_new_tokens=10, ignore_eos=True, stop_token_ids=[stop_id])
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[:ref.token_ids.index(stop_id) + 1]
    with m.session() as s:
        out = s.generate([9, 8, 7], max_new_tokens=10, ignore_eos=True, stop=ref.text[2:4])
    assert out.finish_reason == "stop" and ref.text.startswith(out.text) and len(out.text) <= 2


def test_model_handle_config_tokenizer_and_meta_module(client):
    m = client.model(MODEL)
    served = loaded(MODEL)
    assert m.name == MODEL and m.num_layers == served.config.num_hidden_layers and m.is_chat is False
    assert m.config.to_dict() == served.config.to_dict()
    text = "Hello wörld <s> 2+2?\n"
    assert m.tokenizer.encode(text) == served.tokenizer.encode(text)
    assert m.tokenizer.eos_token_id == served.tokenizer.eos_token_id
    module = m.module
    params = dict(module.named_parameters())
    real = dict(served.model.named_parameters())
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: tuple(v.shape) for k, v in real.items()}
    assert all(p.is_meta for p in params.values())   # names and shapes, zero weight bytes
    assert client.model(MODEL) is m                   # one handle per name


def test_phases_and_io_wait(client, sess):
    sess.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True)
    sess.signal_phase("IO_WAIT")
    assert sess.info()["phase"] == "IO_WAIT"
    sess.signal_phase("ACTIVE")
    with sess.io_wait():
        assert sess.info()["phase"] == "IO_WAIT"
    assert sess.info()["phase"] == "ACTIVE"
    with pytest.raises(djinn.InvalidRequest, match="phase"):
        sess.signal_phase("SLEEPING")


def test_taking_up_a_session_by_id(client, sess):
    m = client.model(MODEL)
    first = sess.generate([11, 12, 13], max_new_tokens=4, ignore_eos=True)
    again = m.session(sess.id)             # the same server-resident session, by its id
    assert again.id == sess.id
    out = again.generate([14], max_new_tokens=3, ignore_eos=True)
    assert out.token_ids == hf_greedy(oracle_model(client), [11, 12, 13] + first.token_ids + [14], 3)
    with pytest.raises(djinn.SessionNotFound):
        m.session("0123456789abcdef0123456789abcdef")


def test_errors_are_typed_and_change_nothing(client, sess):
    ref = sess.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True).token_ids
    before = client.stats()
    with pytest.raises(djinn.ModelNotFound):
        client.model("no-such-model-anywhere")
    with pytest.raises(djinn.InvalidRequest, match="empty prompt"):
        sess.generate("", max_new_tokens=3)
    with pytest.raises(djinn.InvalidRequest, match="max_new_tokens"):
        sess.generate([1, 2], max_new_tokens=0)
    with pytest.raises(djinn.InvalidRequest, match="token ids"):
        sess.generate([5000], max_new_tokens=2)
    with pytest.raises(djinn.InvalidRequest, match="too long"):
        sess.generate([1] * 600, max_new_tokens=2)
    with pytest.raises(djinn.InvalidRequest, match="breakpoint"):
        sess.forward([1, 2], breakpoint=99)
    other = client.model(MODEL).session()
    other.close()
    with pytest.raises(djinn.SessionClosed):
        other.generate([1], max_new_tokens=1)
    other.close()   # twice is harmless
    after = client.stats()
    for key in ("sessions",):
        assert after[key] == before[key]
    assert after["kv_blocks"] == before["kv_blocks"] and after["memory"]["tensors"] == before["memory"]["tensors"]
    out = sess.generate([4], max_new_tokens=3, ignore_eos=True).token_ids
    assert out == hf_greedy(oracle_model(client), [1, 2, 3] + ref + [4], 3)


def test_stats_show_memory_sessions_and_blocks(client, sess):
    sess.generate(list(range(20, 40)), max_new_tokens=2, ignore_eos=True)
    stats = client.stats()
    assert stats["sessions"] >= 1 and stats["memory"]["weights"] == loaded(MODEL).weight_bytes()
    blocks = stats["kv_blocks"][MODEL]
    assert blocks["used"] >= 2 and stats["memory"]["kv_device"] == sum(
        b["used"] * b["block_bytes"] for b in stats["kv_blocks"].values())
    if is_remote(client):
        assert stats["server"]["connections"] >= 1


def test_close_frees_the_sessions_blocks(client):
    m = client.model(MODEL)
    base = client.stats()["kv_blocks"][MODEL]["used"]
    sessions = [m.session() for _ in range(3)]
    for i, s in enumerate(sessions):   # distinct prompts: identical ones would share blocks (prefix sharing)
        s.generate(list(range(3 + i, 40 + i)), max_new_tokens=5, ignore_eos=True)
    assert client.stats()["kv_blocks"][MODEL]["used"] == base + 3 * 3
    for s in sessions:
        s.close()
    assert client.stats()["kv_blocks"][MODEL]["used"] == base
