"""The white-box client API (embedded backend): Paused, RemoteTensor, Scale/Add, capture.

Oracles: arithmetic done with torch on fetched tensors, and transformers with a forward hook
written here on the same weights.
"""

from __future__ import annotations

import pytest
import torch

import djinn
from djinn.protocol.expr import UnsupportedOperation



@pytest.fixture(scope="module")
def client():
    c = djinn.connect(models=["tiny-llama"], device="cpu", kv_blocks=128)
    yield c
    c.close()


@pytest.fixture
def sess(client):
    s = client.model("tiny-llama").session()
    yield s
    s.close()


def hf_model(client):
    """transformers' own module with the weights the client's engine serves (the oracle runs it directly)."""
    return client._backend.engine.runtimes["tiny-llama"].loaded.model


IDS = list(range(40, 57))


def test_public_names_are_importable():
    for name in ("Session", "Paused", "RemoteTensor", "Scale", "Add"):
        assert hasattr(djinn, name), name


def test_forward_pause_resume_through_the_api(client, sess):
    model = hf_model(client)
    with torch.inference_mode():
        ref = model(torch.tensor([IDS])).logits[0]
    p = sess.forward(torch.tensor([IDS]), breakpoint=1)
    assert isinstance(p, djinn.Paused) and (p.layer, p.step) == (1, 0)
    assert isinstance(p.activation, djinn.RemoteTensor) and p.activation.shape == (len(IDS), 64)
    r = p.resume()
    assert isinstance(r.logits, djinn.RemoteTensor) and torch.equal(r.logits.fetch(), ref)
    plain = sess.forward([1, 2, 3])           # no breakpoint: logits directly
    assert plain.logits.shape == (3, model.config.vocab_size)
    assert sess.info()["tokens"] == len(IDS) + 3


def test_steering_through_the_api_equals_a_hooked_transformers_forward(client, sess):
    model = hf_model(client)
    handle = model.model.layers[1].register_forward_hook(lambda m, a, out: out * 0.9)
    try:
        with torch.inference_mode():
            ref = model(torch.tensor([IDS])).logits[0]
    finally:
        handle.remove()
    p = sess.forward(IDS, breakpoint=1)
    assert torch.equal(p.resume(p.activation * 0.9).logits.fetch(), ref)


def test_lazy_resume_moves_no_activation_bytes(client):
    backend = client._backend
    m = client.model("tiny-llama")
    results, moved = [], []
    for lazy in (True, False):
        with m.session() as s:
            p = s.forward(IDS, breakpoint=1)
            before = dict(backend.tensor_bytes)
            r = p.resume(p.activation * 0.9) if lazy else p.resume(p.activation.fetch() * 0.9)
            moved.append({k: backend.tensor_bytes[k] - before[k] for k in before})
            results.append(r.logits.fetch())
    act_bytes = len(IDS) * 64 * 4
    assert moved[0] == {"sent": 0, "received": 0}
    assert moved[1] == {"sent": act_bytes, "received": act_bytes}
    assert torch.equal(results[0], results[1])


def test_server_side_expressions_equal_torch_on_the_fetched_tensors(sess):
    out = sess.generate(IDS, max_new_tokens=3, capture=[0, 2])
    a, b = out.captured[0], out.captured[2]
    ha, hb = a.fetch(), b.fetch()
    assert ha.shape == (len(IDS) + 2, 64)
    c = torch.linspace(-1, 1, 64)
    cases = [
        (a * 0.9, ha * 0.9), (0.9 * a, 0.9 * ha), (a + b, ha + hb), (a - b, ha - hb), (2 - a, 2 - ha),
        (a / 3, ha / 3), (1 / (a + 5), 1 / (ha + 5)), (-a, -ha), (a * c, ha * c), (c * a, c * ha),
        (c - a, c - ha), (torch.mul(c, a), c * ha), (a[3], ha[3]), (a[1:5, ::2], ha[1:5, ::2]),
        (a[..., None, -3:], ha[..., None, -3:]), ((a * 0.5 + b)[-1] / 2, (ha * 0.5 + hb)[-1] / 2),
    ]
    for lazy, eager in cases:
        assert lazy.id is None and lazy.shape == eager.shape, lazy
        assert torch.equal(lazy.fetch(), eager), lazy


def test_unsupported_operations_say_what_is_supported(sess):
    p = sess.forward(IDS, breakpoint=0)
    x = p.activation
    for op in (lambda: x.sum(), lambda: x @ torch.ones(64), lambda: x ** 2, lambda: abs(x), lambda: x > 0,
               lambda: torch.relu(x), lambda: x * "a", lambda: x[torch.tensor([0])]):
        with pytest.raises(UnsupportedOperation, match="supported: "):
            op()
    with pytest.raises(djinn.InvalidRequest, match="broadcast"):
        x + torch.ones(3)                      # caught on the client, from shapes alone
    p.resume()


def test_remote_tensors_of_two_sessions_do_not_mix(client):
    m = client.model("tiny-llama")
    with m.session() as s1, m.session() as s2:
        a = s1.forward([1, 2, 3]).logits
        b = s2.forward([4, 5, 6]).logits
        with pytest.raises(djinn.InvalidRequest, match="one session"):
            a + b
        p = s1.forward([7], breakpoint=0)
        with pytest.raises(djinn.InvalidRequest, match="another session"):
            p.resume(s2.forward([8], breakpoint=0).activation)
        p.resume()


def test_generate_with_a_breakpoint_returns_paused_and_resume_finishes_it(client):
    m = client.model("tiny-llama")
    with m.session() as s0:
        plain = s0.generate(IDS, max_new_tokens=5, ignore_eos=True).token_ids
    with m.session() as s:
        p = s.generate(IDS, max_new_tokens=5, ignore_eos=True, breakpoint=(2, 3), capture=[2])
        assert isinstance(p, djinn.Paused) and (p.layer, p.step) == (2, 3) and p.activation.shape == (1, 64)
        with pytest.raises(djinn.InvalidRequest, match="paused"):
            s.generate("more", max_new_tokens=2)
        out = p.resume()
        assert isinstance(out, djinn.GenerateResult) and out.token_ids == plain
        assert out.captured[2].shape == (len(IDS) + 4, 64)
        with pytest.raises(djinn.InvalidRequest, match="already resumed"):
            p.resume()


def test_scale_and_add_interventions_through_the_api(client, sess):
    model = hf_model(client)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    hooks = [model.model.layers[0].register_forward_hook(lambda m, a, out: out * 1.5),
             model.model.layers[2].register_forward_hook(lambda m, a, out: out + v)]
    try:
        ids = torch.tensor([IDS])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(IDS):].tolist()
    finally:
        for h in hooks:
            h.remove()
    out = sess.generate(IDS, max_new_tokens=6, ignore_eos=True,
                        interventions=[djinn.Scale(layer=0, factor=1.5), djinn.Add(layer=2, vector=v)])
    assert out.token_ids == ref
    with pytest.raises(djinn.InvalidRequest, match="djinn.Scale"):
        sess.generate(IDS, max_new_tokens=2, interventions=[("scale", 0, 0.5)])


def test_release_and_close_free_server_tensors(client):
    m = client.model("tiny-llama")
    s = m.session()
    logits = s.forward(IDS).logits
    stats = client.stats()["memory"]["tensors"]
    assert stats >= logits.numel() * 4
    logits.release()
    with pytest.raises(djinn.InvalidRequest, match="released"):
        logits.fetch()
    p = s.forward([1], breakpoint=0)
    s.close()
    with pytest.raises(djinn.SessionClosed):
        p.resume()
    with pytest.raises(djinn.InvalidRequest, match="closed"):
        client._backend.fetch(p.activation.id)
