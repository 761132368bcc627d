"""White-box execution against transformers as the oracle.

The oracles are transformers' own forward / generate on the same weights, with its own
DynamicCache for decode steps, and forward hooks written here (not Djinn code) on the
model's own decoder layers for steering. CPU float32 throughout, so "equal" means
``torch.equal``: Djinn runs the very same modules on the very same inputs (K/V gathered
from the pool are bit copies of transformers' cache), and the steering arithmetic is the
same elementwise op in the same dtype as the hook's, so nothing may differ by even one ulp.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from djinn.config import EngineConfig, MemoryConfig
from djinn.engine import Engine, GenerateRequest, SamplingParams
from djinn.engine.session import Phase
from djinn.errors import CapacityError, InvalidRequest, SessionClosed, SessionNotFound, UnsupportedModel

from tests.conftest import loaded, requires_smollm2

MODELS = ["tiny-llama", "tiny-gpt2", pytest.param("smollm2-135m", marks=requires_smollm2)]


# ---------------------------------------------------------------- oracles (transformers only)

def hf_layers(model) -> torch.nn.ModuleList:
    """The decoder layers, found the way a user of transformers would (not Djinn's adapter)."""
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


class LayerEdit:
    """A forward hook on decoder layer ``layer`` applying ``fn(h, rows)`` to its output for the
    absolute positions in ``positions`` (None: all). Tracks positions across calls, so it
    follows a generation (prefill, then one token per step)."""

    def __init__(self, model, layer: int, fn, positions=None, record: bool = False):
        self.fn, self.positions, self.seen, self.record = fn, positions, 0, record
        self.outputs: list[torch.Tensor] = []
        self.handle = hf_layers(model)[layer].register_forward_hook(self)

    def __call__(self, module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        q = h.shape[1]
        if self.fn is not None:
            if self.positions is None:
                h = self.fn(h)
            else:
                end = self.seen + q
                rows = sorted({(p if p >= 0 else end + p) - self.seen for p in self.positions
                               if self.seen <= (p if p >= 0 else end + p) < end})
                if rows:
                    h = h.clone()
                    h[:, rows] = self.fn(h[:, rows])
        self.seen += q
        if self.record:
            self.outputs.append(h[0].clone())
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def remove(self):
        self.handle.remove()


def hf_logits(model, ids: list[int], past: list[int] | None = None) -> torch.Tensor:
    """Logits of ``ids``; with ``past``, as a decode over transformers' own cache of ``past``."""
    with torch.inference_mode():
        if past is None:
            return model(torch.tensor([ids], device=model.device)).logits[0]
        cache = DynamicCache(config=model.config)
        model(torch.tensor([past], device=model.device), past_key_values=cache, use_cache=True)
        return model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True).logits[0]


def hf_greedy(model, history: list[int], n: int) -> list[int]:
    ids = torch.tensor([history], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(history):].tolist()


# ---------------------------------------------------------------- helpers

def make_engine(lm, blocks: int = 128, **config) -> Engine:
    return Engine({"m": lm}, EngineConfig(memory=MemoryConfig(kv_blocks=blocks), **config))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def prompt(lm, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, min(lm.config.vocab_size, 1000), (n,), generator=gen).tolist()


def logits_of(eng: Engine, reply: dict) -> torch.Tensor:
    return eng.fetch(reply["logits"]["id"])


@pytest.fixture
def llama_engine():
    lm = loaded("tiny-llama")
    eng = make_engine(lm)
    yield eng, lm
    eng.shutdown()


# ---------------------------------------------------------------- resume == plain forward

@pytest.mark.parametrize("name", MODELS)
def test_unmodified_resume_is_bitwise_plain_forward_at_every_layer(name):
    lm = loaded(name)
    eng = make_engine(lm)
    prefix, tok, cont = prompt(lm, 9, 1), prompt(lm, 1, 2), prompt(lm, 2, 3)
    ref_prefill = hf_logits(lm.model, prefix)
    ref_decode = hf_logits(lm.model, tok, past=prefix)
    ref_cont = hf_greedy(lm.model, prefix + tok + cont, 4)
    L = lm.config.num_hidden_layers
    try:
        for layer in range(L):
            sid = eng.open_session("m")
            p = eng.forward(sid, prefix, breakpoint=layer)["paused"]
            assert p["layer"] == layer and p["step"] == 0
            assert p["activation"]["shape"] == [len(prefix), lm.config.hidden_size]
            assert torch.equal(logits_of(eng, eng.resume(p["paused_id"])), ref_prefill), f"prefill, layer {layer}"
            p = eng.forward(sid, tok, breakpoint=layer)["paused"]          # a decode step over the session's KV
            assert torch.equal(logits_of(eng, eng.resume(p["paused_id"])), ref_decode), f"decode, layer {layer}"
            # the KV the paused forwards wrote is right: greedy continuation matches transformers
            # (at every layer of the tiny models; at first, middle and last of SmolLM2, where a
            # CPU decode step costs ~0.1 s)
            if L <= 4 or layer in (0, L // 2, L - 1):
                out = eng.generate(sid, GenerateRequest(cont, greedy(4)))
                assert out.token_ids == ref_cont, f"continuation, layer {layer}"
            eng.close_session(sid)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("name", MODELS)
def test_breakpoint_inside_generation_resumes_to_transformers_generate(name):
    lm = loaded(name)
    eng = make_engine(lm)
    ids, n = prompt(lm, 11, 4), 4
    ref = hf_greedy(lm.model, ids, n)
    L = lm.config.num_hidden_layers
    try:
        for layer, step in [(0, 0), (L // 2, 1), (L - 1, n - 1)]:
            sid = eng.open_session("m")
            paused = eng.generate(sid, GenerateRequest(ids, greedy(n), breakpoint=(layer, step)))
            assert paused.finish_reason == "breakpoint" and paused.token_ids == ref[:step]
            q = len(ids) if step == 0 else 1
            assert paused.paused["activation"]["shape"] == [q, lm.config.hidden_size]
            assert eng.session_info(sid)["phase"] == "PAUSED"
            out = eng.resume(paused.paused["paused_id"])["generation"]
            assert out.token_ids == ref and out.finish_reason == "length", (layer, step)
            assert eng.session_info(sid)["phase"] == "ACTIVE"
            # the session continues like any other
            more = eng.generate(sid, GenerateRequest([7], greedy(2))).token_ids
            assert more == hf_greedy(lm.model, ids + ref + [7], 2)
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- steering is real

@pytest.mark.parametrize("name", MODELS)
def test_steering_one_decode_step_at_a_breakpoint_equals_a_hook_on_that_token(name):
    lm = loaded(name)
    eng = make_engine(lm)
    ids, n, step = prompt(lm, 8, 14), 5, 2
    layer = lm.config.num_hidden_layers // 2
    position = len(ids) + step - 1          # the token decode step 2 computes
    edit = LayerEdit(lm.model, layer, lambda h: -h * 0.5, positions=[position])
    recorder = LayerEdit(lm.model, layer, None, record=True)
    try:
        ref = hf_greedy(lm.model, ids, n)
    finally:
        edit.remove()
        recorder.remove()
    try:
        sid = eng.open_session("m")
        g = eng.generate(sid, GenerateRequest(ids, greedy(n), breakpoint=(layer, step), capture=[layer]))
        act = g.paused["activation"]["id"]
        out = eng.resume(g.paused["paused_id"], {"op": "mul", "args": [{"op": "neg", "args": [{"ref": act}]},
                                                                         {"scalar": 0.5}]})["generation"]
        assert out.token_ids == ref
        assert torch.equal(eng.fetch(out.captured[layer]["id"]), torch.cat(recorder.outputs))
    finally:
        eng.shutdown()


@pytest.mark.parametrize("name", MODELS)
def test_resume_with_scaled_or_shifted_activation_equals_a_hooked_transformers_forward(name):
    lm = loaded(name)
    eng = make_engine(lm)
    ids = prompt(lm, 13, 5)
    v = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(9))
    L = lm.config.num_hidden_layers
    # (hook on transformers' layer, the same edit on a fetched activation, the same as an expression)
    edits = [(lambda h: h * 0.9, lambda a: a * 0.9, lambda ref: ({"op": "mul", "args": [ref, {"scalar": 0.9}]}, [])),
             (lambda h: h + v, lambda a: a + v, lambda ref: ({"op": "add", "args": [ref, {"tensor": 0}]}, [v]))]
    try:
        for layer in sorted({0, L - 1}):
            for hook_fn, client_edit, server_expr in edits:
                hook = LayerEdit(lm.model, layer, hook_fn)
                try:
                    ref = hf_logits(lm.model, ids)
                finally:
                    hook.remove()
                assert not torch.equal(ref, hf_logits(lm.model, ids))   # the edit changes the logits
                for how in ("server", "client"):
                    sid = eng.open_session("m")
                    p = eng.forward(sid, ids, breakpoint=layer)["paused"]
                    act = p["activation"]["id"]
                    if how == "server":   # p.activation * 0.9 evaluated by the engine
                        reply = eng.resume(p["paused_id"], *server_expr({"ref": act}))
                    else:                 # p.activation.fetch() * 0.9 sent back
                        reply = eng.resume(p["paused_id"], client_edit(eng.fetch(act)))
                    assert torch.equal(logits_of(eng, reply), ref), (layer, how)
                    eng.close_session(sid)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("name", MODELS)
def test_interventions_over_a_generation_equal_transformers_generate_with_the_same_hooks(name):
    lm = loaded(name)
    eng = make_engine(lm)
    L = lm.config.num_hidden_layers
    ids, n = prompt(lm, 9, 6), 6
    v = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.5
    scale_layer, add_layer, last = min(1, L - 1), L - 1, L - 1
    cases = [
        ([{"kind": "scale", "layer": scale_layer, "factor": 0.5, "positions": None}],
         [(scale_layer, lambda h: h * 0.5, None)]),
        ([{"kind": "add", "layer": add_layer, "vector": v, "positions": None}],
         [(add_layer, lambda h: h + v, None)]),
        # positions: two prompt tokens, and -1 = the newest token of every forward
        ([{"kind": "scale", "layer": 0, "factor": 1.7, "positions": [2, 5]},
          {"kind": "add", "layer": add_layer, "vector": v, "positions": [-1]}],
         [(0, lambda h: h * 1.7, [2, 5]), (add_layer, lambda h: h + v, [-1])]),
    ]
    try:
        plain = LayerEdit(lm.model, last, None, record=True)
        try:
            hf_greedy(lm.model, ids, n)
        finally:
            plain.remove()
        for interventions, hooks in cases:
            edits = [LayerEdit(lm.model, layer, fn, pos) for layer, fn, pos in hooks]
            recorder = LayerEdit(lm.model, last, None, record=True)   # registered last: sees the edited output
            try:
                ref = hf_greedy(lm.model, ids, n)
            finally:
                for e in edits + [recorder]:
                    e.remove()
            assert not torch.equal(torch.cat(recorder.outputs), torch.cat(plain.outputs))   # the hooks changed it
            sid = eng.open_session("m")
            out = eng.generate(sid, GenerateRequest(ids, greedy(n), interventions=interventions, capture=[last]))
            assert out.token_ids == ref, interventions
            captured = eng.fetch(out.captured[last]["id"])
            assert captured.shape == (len(ids) + n - 1, lm.config.hidden_size)
            assert torch.equal(captured, torch.cat(recorder.outputs)), interventions
            eng.close_session(sid)
    finally:
        eng.shutdown()


def test_interventions_on_a_forward_and_capture_of_several_layers(llama_engine):
    eng, lm = llama_engine
    ids = prompt(lm, 10, 8)
    edit = LayerEdit(lm.model, 1, lambda h: h * -2.0, positions=[0, 9])
    try:
        ref = hf_logits(lm.model, ids)
    finally:
        edit.remove()
    sid = eng.open_session("m")
    reply = eng.forward(sid, ids, interventions=[{"kind": "scale", "layer": 1, "factor": -2.0, "positions": [0, 9]}])
    assert torch.equal(logits_of(eng, reply), ref)
    # capture of every layer = transformers' hidden states (out.hidden_states[i + 1] is layer i's output)
    sid2 = eng.open_session("m")
    out = eng.generate(sid2, GenerateRequest(ids, greedy(1), capture=[0, 1, 2]))
    with torch.inference_mode():
        hs = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for layer in (0, 1):   # the last one is after the final norm in transformers' list
        assert torch.equal(eng.fetch(out.captured[layer]["id"]), hs[layer + 1][0])


# ---------------------------------------------------------------- pause frees the engine

@pytest.mark.parametrize("name,layer", [("tiny-llama", 1), pytest.param("smollm2-135m", 6, marks=requires_smollm2)])
def test_a_paused_session_holds_no_compute_and_its_blocks_may_move(name, layer):
    lm = loaded(name)
    eng = make_engine(lm)
    a_ids, b_ids = prompt(lm, 21, 10), prompt(lm, 7, 11)
    try:
        a = eng.open_session("m")
        p = eng.forward(a, a_ids, breakpoint=layer)["paused"]
        assert eng.stats()["sessions_by_phase"] == {"PAUSED": 1}
        # B runs a whole generation on the loop while A is paused (bounded wait: no deadlock)
        done: dict = {}
        b = eng.open_session("m")
        t = threading.Thread(target=lambda: done.setdefault("out", eng.generate(b, GenerateRequest(b_ids, greedy(6)))))
        t.start()
        t.join(60)
        assert not t.is_alive() and done["out"].token_ids == hf_greedy(lm.model, b_ids, 6)
        assert eng.session_info(a)["phase"] == "PAUSED"

        # the memory manager parks A and restores it into other physical blocks
        def move():
            s, pool = eng.sessions[a], eng.runtimes["m"].pool
            new = pool.allocate(len(s.block_table))
            pool.kv[new] = pool.kv[s.block_table]
            pool.kv[s.block_table] = float("nan")   # stale blocks must not be read again
            pool.release(s.block_table)
            s.block_table[:] = new
        eng.loop.call(move)
        assert torch.equal(logits_of(eng, eng.resume(p["paused_id"])), hf_logits(lm.model, a_ids))
        assert eng.generate(a, GenerateRequest([3, 4], greedy(4))).token_ids == hf_greedy(lm.model, a_ids + [3, 4], 4)
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- errors leave everything usable

def test_bad_white_box_requests_are_clear_errors_and_change_nothing(llama_engine):
    eng, lm = llama_engine
    ids = prompt(lm, 12, 12)
    pool = eng.runtimes["m"].pool
    sid = eng.open_session("m")
    free = pool.free_count
    for bad in (3, -1, 1.5, True):
        with pytest.raises(InvalidRequest, match="breakpoint"):
            eng.forward(sid, ids, breakpoint=bad)
    with pytest.raises(InvalidRequest, match="breakpoint layer"):
        eng.generate(sid, GenerateRequest(ids, greedy(2), breakpoint=(3, 0)))
    with pytest.raises(InvalidRequest, match="never runs"):
        eng.generate(sid, GenerateRequest(ids, greedy(2), breakpoint=(0, 2)))
    for bad, match in [({"kind": "scale", "layer": 3, "factor": 1.0}, "layer"),
                       ({"kind": "scale", "layer": 0, "factor": float("nan")}, "finite"),
                       ({"kind": "add", "layer": 0, "vector": torch.ones(3)}, "shape"),
                       ({"kind": "add", "layer": 0, "vector": torch.full((64,), float("inf"))}, "NaN"),
                       ({"kind": "mul", "layer": 0}, "Scale")]:
        with pytest.raises(InvalidRequest, match=match):
            eng.generate(sid, GenerateRequest(ids, greedy(2), interventions=[bad]))
    with pytest.raises(InvalidRequest, match="capture"):
        eng.generate(sid, GenerateRequest(ids, greedy(2), capture=[7]))
    assert pool.free_count == free and eng.session_info(sid)["tokens"] == 0

    p = eng.forward(sid, ids, breakpoint=1)["paused"]
    pid, act = p["paused_id"], p["activation"]["id"]
    good = eng.fetch(act)
    with pytest.raises(InvalidRequest, match="paused"):
        eng.generate(sid, GenerateRequest([1], greedy(2)))
    with pytest.raises(InvalidRequest, match="paused"):
        eng.forward(sid, [1])
    eng.signal_phase(sid, "IO_WAIT")        # allowed: may park the KV; the session stays paused
    assert eng.session_info(sid)["phase"] == "PAUSED"
    eng.signal_phase(sid, "ACTIVE")
    nan = good.clone()
    nan[3, 5] = float("nan")
    for bad, match in [(good[:-1], "shape"), (good.unsqueeze(0), "shape"), (good.long(), "dtype"),
                       (nan, "NaN"), (good * float("inf"), "NaN"), (torch.empty(good.shape, device="meta"), "is on meta"),
                       (torch.full(good.shape, 1e39, dtype=torch.float64), "NaN"),  # finite, but not in float32
                       ({"op": "div", "args": [{"ref": act}, {"scalar": 0}]}, "NaN"),
                       ({"op": "mul", "args": [{"ref": act}, {"ref": "t999"}]}, "unknown tensor"),
                       ({"op": "pow", "args": [{"ref": act}, {"scalar": 2}]}, "unknown op"),
                       ("0.9", "takes nothing")]:
        with pytest.raises(InvalidRequest, match=match):
            eng.resume(pid, bad)
        assert eng.session_info(sid)["phase"] == "PAUSED"
    other = eng.open_session("m")
    eng.generate(other, GenerateRequest([5, 6], greedy(1), capture=[0]))
    foreign = eng.forward(other, [1, 2])["logits"]["id"]
    with pytest.raises(InvalidRequest, match="another session"):
        eng.resume(pid, {"op": "add", "args": [{"ref": act}, {"ref": foreign}]})
    with pytest.raises(InvalidRequest, match="paused forward"):
        eng.release(act)
    # after all that, the paused forward resumes exactly
    assert torch.equal(logits_of(eng, eng.resume(pid)), hf_logits(lm.model, ids))
    with pytest.raises(InvalidRequest, match="already resumed"):
        eng.resume(pid)
    with pytest.raises(InvalidRequest, match="unknown paused"):
        eng.resume("p999")
    with pytest.raises(InvalidRequest, match="unknown tensor"):
        eng.fetch("t999")
    eng.release(act)
    with pytest.raises(InvalidRequest, match="released"):
        eng.fetch(act)
    # resuming after close
    p = eng.forward(sid, [9, 9], breakpoint=0)["paused"]
    eng.close_session(sid)
    with pytest.raises(SessionClosed):
        eng.resume(p["paused_id"])
    with pytest.raises(InvalidRequest, match="closed"):
        eng.fetch(p["activation"]["id"])
    with pytest.raises(SessionNotFound):
        eng.forward(sid, [1])
    assert eng.stats()["memory"]["tensors"] == eng.whitebox.store.session_bytes(other) > 0


def test_a_failed_resume_of_a_generation_rolls_the_turn_back(llama_engine, monkeypatch):
    eng, lm = llama_engine
    sid = eng.open_session("m")
    eng.generate(sid, GenerateRequest([1, 2, 3], greedy(2)))
    before = eng.session_info(sid)
    g = eng.generate(sid, GenerateRequest([4, 5], greedy(4), breakpoint=(1, 2)))
    head = eng.runtimes["m"].arch.lm_head     # the head of the step it resumes in fails
    monkeypatch.setattr(head, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        eng.resume(g.paused["paused_id"])
    monkeypatch.undo()
    after = eng.session_info(sid)
    assert (after["tokens"], after["kv_tokens"], after["phase"]) == (before["tokens"], before["kv_tokens"], "ACTIVE")
    hist = [1, 2, 3] + hf_greedy(lm.model, [1, 2, 3], 2)
    assert eng.generate(sid, GenerateRequest([4, 5], greedy(3))).token_ids == hf_greedy(lm.model, hist + [4, 5], 3)


def test_tensor_store_bounds_evict_oldest_and_refuse_what_cannot_fit():
    lm = loaded("tiny-llama")
    eng = make_engine(lm, max_tensors_per_session=3)
    try:
        sid = eng.open_session("m")
        refs = [eng.forward(sid, [i + 5])["logits"] for i in range(4)]
        with pytest.raises(InvalidRequest, match="evicted"):
            eng.fetch(refs[0]["id"])
        assert eng.fetch(refs[3]["id"]).shape == (1, lm.config.vocab_size)
        p = eng.forward(sid, [1, 2], breakpoint=0)["paused"]       # pinned until resumed
        assert eng.resume(p["paused_id"])["logits"]["shape"] == [2, lm.config.vocab_size]
        assert eng.fetch(p["activation"]["id"]).shape == (2, 64)
    finally:
        eng.shutdown()
    eng = make_engine(lm, max_tensor_bytes_per_session=10_000)
    try:
        sid = eng.open_session("m")
        with pytest.raises(CapacityError, match="at most"):
            eng.forward(sid, list(range(5, 30)))   # 25 x 259 float32 logits > 10 kB
        assert eng.session_info(sid)["tokens"] == 0 and eng.runtimes["m"].pool.used_count == 0
    finally:
        eng.shutdown()


def tiny_loaded(config):
    """A random-init transformers model of another architecture, wrapped like a loaded preset."""
    from transformers import AutoModelForCausalLM

    from djinn.models.loading import LoadedModel
    from djinn.models.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(name=config.model_type, model=model, tokenizer=byte_tokenizer(), config=config,
                       device=torch.device("cpu"), dtype=torch.float32, is_chat=False, source="preset")


def _arch_configs():
    from transformers import GPTNeoXConfig, PhiConfig, Qwen2Config

    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=300,
                 max_position_embeddings=256)
    return [GPTNeoXConfig(**shape), Qwen2Config(num_key_value_heads=2, **shape), PhiConfig(**shape)]


@pytest.mark.parametrize("config", _arch_configs(), ids=lambda c: c.model_type)
def test_other_architectures_pause_resume_and_steer_with_no_code_of_their_own(config):
    lm = tiny_loaded(config)
    eng = make_engine(lm, blocks=32)
    ids = prompt(lm, 12, 13)
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    try:
        for layer in range(2):
            sid = eng.open_session("m")
            p = eng.forward(sid, ids, breakpoint=layer)["paused"]
            assert torch.equal(logits_of(eng, eng.resume(p["paused_id"])), hf_logits(lm.model, ids))
            assert eng.generate(sid, GenerateRequest([5, 6], greedy(4))).token_ids == hf_greedy(lm.model, ids + [5, 6], 4)
            hook = LayerEdit(lm.model, layer, lambda h: h + v)
            try:
                ref = hf_logits(lm.model, ids)
            finally:
                hook.remove()
            p = eng.forward(eng.open_session("m"), ids, breakpoint=layer)["paused"]
            assert torch.equal(logits_of(eng, eng.resume(p["paused_id"], eng.fetch(p["activation"]["id"]) + v)), ref)
    finally:
        eng.shutdown()


def test_a_model_without_a_flat_layer_list_is_a_clear_unsupported_error():
    from transformers import OPTConfig

    opt = tiny_loaded(OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                vocab_size=300, max_position_embeddings=256, word_embed_proj_dim=64))
    eng = Engine(config=EngineConfig(memory=MemoryConfig(kv_blocks=8)))
    try:
        with pytest.raises(UnsupportedModel, match="list of decoder layers"):   # OPT nests them in model.decoder
            eng.add_model("opt", opt)
        assert eng.runtimes == {}
    finally:
        eng.shutdown()


def test_phase_is_restored_after_resume(llama_engine):
    eng, _ = llama_engine
    sid = eng.open_session("m")
    eng.generate(sid, GenerateRequest([1, 2], greedy(1)))
    eng.signal_phase(sid, "IO_WAIT")
    p = eng.forward(sid, [3], breakpoint=2)["paused"]
    assert eng.sessions[sid].phase is Phase.PAUSED
    eng.resume(p["paused_id"])
    assert eng.sessions[sid].phase is Phase.IO_WAIT
