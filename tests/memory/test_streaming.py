"""Weight streaming against the same model fully resident (transformers' own forward and
generate are the oracles), plus the slot/fence discipline with a recording copy engine and a
slow CPU copy."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaConfig

from djinn.config import EngineConfig, MemoryConfig, default_home
from djinn.engine import Engine, GenerateRequest
from djinn.engine.cache import PagedCache
from djinn.engine.executor import Executor
from djinn.engine.runtime import ModelRuntime, kv_geometry
from djinn.errors import CapacityError, InvalidRequest
from djinn.memory.blocks import BlockPool
from djinn.memory.budget import should_offload
from djinn.memory.copier import Copier, ThreadCopier, chunks
from djinn.memory.streaming import WeightStreamer
from djinn.models import LoadedModel, build_random, byte_tokenizer, load_model
from djinn.models.adapter import locate
from djinn.models.loading import _seeded
from djinn.models.offload import build_random_offloaded

from tests.conftest import SMOLLM2, loaded, requires_smollm2
from tests.engine.test_generate import greedy, hf_greedy

CPU = torch.device("cpu")
_STREAMED: dict = {}


def streamed(name: str) -> LoadedModel:
    """The model ``loaded(name)`` holds, loaded again with its decoder layers in a host arena."""
    if name not in _STREAMED:
        _STREAMED[name] = load_model(name, device=CPU, home=default_home(), progress=False, offload=True)
    return _STREAMED[name]


def five_layer_pair(resident_layers: int = 0) -> tuple[LoadedModel, torch.nn.Module]:
    """A 5-layer tiny Llama, streamed (but its first ``resident_layers``), and its resident twin
    (same seed => same weights)."""
    key = ("five", resident_layers)
    if key not in _STREAMED:
        tok = byte_tokenizer()
        cfg = lambda: LlamaConfig(hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=96, vocab_size=tok.vocab_size, max_position_embeddings=256,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
        model, arena = build_random_offloaded(cfg(), device=CPU, dtype=torch.float32, seed=3, seeded=_seeded,
                                              resident_layers=resident_layers)
        model.eval()
        lm = LoadedModel(name="five", model=model, tokenizer=tok, config=model.config, device=CPU,
                         dtype=torch.float32, is_chat=False, source="preset", arena=arena)
        _STREAMED[key] = (lm, build_random(cfg(), device=CPU, dtype=torch.float32, seed=3).eval())
    return _STREAMED[key]


class Runner:
    """Forwards of several sessions through one executor (the engine's loop does the same)."""

    def __init__(self, lm: LoadedModel, layer_source=None):
        self.arch = locate(lm.model)
        self.executor = Executor(lm.model, self.arch, layer_source=layer_source)
        self.device = lm.device
        self.pool = BlockPool(kv_geometry(lm.config, 16, lm.dtype), 64, lm.device)
        self.tables: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}

    @torch.inference_mode()
    def start(self, sid: str, ids: list[int], until: int | None = None):
        """Begin a forward and run layers 0..until (None: none yet); returns the paused state."""
        table = self.tables.setdefault(sid, [])
        start = self.cached.get(sid, 0)
        need = self.pool.shape.blocks_for(start + len(ids)) - len(table)
        if need > 0:
            table.extend(self.pool.allocate(need))
        st = self.executor.begin(PagedCache(self.pool, table, start, len(ids)), torch.tensor([ids], device=self.device))
        self.cached[sid] = start + len(ids)
        return st if until is None else self.executor.run_layers(st, until=until)

    @torch.inference_mode()
    def resume(self, st, hook=None):
        return self.executor.finish(self.executor.run_layers(st, hook=hook), last_only=False)

    def forward(self, sid: str, ids: list[int], hook=None) -> torch.Tensor:
        return self.resume(self.start(sid, ids), hook=hook)


def with_streamer(lm: LoadedModel, slots: int, copier: Copier | None = None, chunk: int | None = None):
    streamer = WeightStreamer(lm.arena, lm.device, slots, chunk, copier=copier)
    return Runner(lm, streamer), streamer


def prompt(n: int, seed: int = 0, vocab: int = 250) -> list[int]:
    return torch.randint(5, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- building ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_offloaded_build_has_the_resident_builds_weights_and_layers_in_one_arena(name):
    res, st = loaded(name), streamed(name)
    rp, sp = dict(res.model.named_parameters()), dict(st.model.named_parameters())
    assert rp.keys() == sp.keys()
    for key in rp:
        assert torch.equal(rp[key], sp[key]), key
    layers = locate(st.model).layers
    in_layers = {id(p) for p in layers.parameters()}
    for key, p in sp.items():
        assert st.arena.contains(p) == (id(p) in in_layers), key  # exactly the decoder layers live in the arena
    assert st.weight_bytes() == res.weight_bytes()
    assert st.weight_bytes(resident_only=True) == res.weight_bytes() - sum(p.numel() * 4 for p in layers.parameters())
    assert st.arena.buffer.numel() >= sum(p.numel() * 4 for p in layers.parameters())


# ---- equality with the resident model -------------------------------------------------------
MODELS = ["tiny-llama", pytest.param(SMOLLM2, marks=requires_smollm2)]


@pytest.mark.parametrize("name", MODELS)
def test_streamed_prefill_logits_equal_transformers_resident_forward(name):
    res, st = loaded(name), streamed(name)
    ids = prompt(37)
    with torch.inference_mode():
        first = res.model(torch.tensor([ids]), use_cache=True)
        want = first.logits[0].float()
        want_next = res.model(torch.tensor([[7, 8]]), past_key_values=first.past_key_values).logits[0].float()
    for slots in (1, 2, 3):   # fewer slots than layers, down to one
        run, streamer = with_streamer(st, slots)
        assert torch.equal(run.forward("a", ids), want), slots
        assert torch.equal(run.forward("a", [7, 8]), want_next), slots   # continues from the paged KV
        streamer.close()


@pytest.mark.parametrize("name", MODELS)
def test_streamed_engine_greedy_equals_transformers_generate(name):
    res, st = loaded(name), streamed(name)
    turns = [(9, 5), (14, 3)]
    # transformers' generate on the resident model, two sessions of two turns each
    want: list[list[list[int]]] = []
    for k in range(2):
        history, outs = [], []
        for turn, (plen, n) in enumerate(turns):
            history += prompt(plen, seed=10 * turn + k)
            outs.append(hf_greedy(res.model, history, n))
            history += outs[-1]
        want.append(outs)
    for slots in (1, 2, 3):
        eng = Engine({"m": st}, EngineConfig(memory=MemoryConfig(kv_blocks=128, stream_slots=slots)))
        try:
            assert eng.runtimes["m"].streamer is not None
            sids = [eng.open_session("m"), eng.open_session("m")]
            for turn, (plen, n) in enumerate(turns):
                for k, sid in enumerate(sids):  # two sessions interleaved on one streamed model
                    out = eng.generate(sid, GenerateRequest(prompt(plen, seed=10 * turn + k), greedy(n)))
                    assert out.token_ids == want[k][turn], (slots, turn, k)
            stats = eng.stats()
            assert stats["memory"]["weights"] == res.weight_bytes()
            assert stats["streaming"]["m"]["slots"] == slots
        finally:
            eng.shutdown()


def test_more_slots_than_layers_streams_each_layer_once():
    st = streamed("tiny-llama")
    run, streamer = with_streamer(st, slots=5)
    for k in range(4):
        run.forward("a", prompt(5, seed=k))
    assert streamer.num_slots == 3 and streamer.counters["layer_loads"] == 3
    assert streamer.counters["bytes_streamed"] == st.arena.nbytes


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_one_pass_over_the_weights_per_forward_whatever_the_prompt_length(slots):
    lm, _ = five_layer_pair()
    run, streamer = with_streamer(lm, slots)
    run.forward("a", prompt(3))                     # warm: the ring wraps into the next forward
    for n in (1, 40, 1, 90):                        # a long prompt is one block, not one pass per token
        before = streamer.counters["layer_loads"]
        run.forward("a", prompt(n, seed=n))
        assert streamer.counters["layer_loads"] - before == 5
    streamer.close()


def test_breakpoints_interleaved_sessions_and_interventions_on_a_streamed_model():
    lm, twin = five_layer_pair()
    twin_lm = LoadedModel(name="twin", model=twin, tokenizer=lm.tokenizer, config=twin.config, device=CPU,
                          dtype=torch.float32, is_chat=False, source="preset")
    ref = Runner(twin_lm)
    run, streamer = with_streamer(lm, slots=2)
    scale = lambda i, h: h * 0.5 if i == 2 else h    # an intervention: applied after layer 2
    for r in (ref, run):
        r.out = []
        a = r.start("A", prompt(21, seed=1), until=1)        # A pauses after layer 1
        r.out.append(r.forward("B", prompt(9, seed=2)))      # B runs a whole forward meanwhile
        b = r.start("B", [4], until=3)                       # B pauses after layer 3
        r.out.append(r.resume(a, hook=scale))                # A resumes, with an intervention
        r.out.append(r.forward("A", [6, 7]))
        r.out.append(r.resume(b))
    for got, want in zip(run.out, ref.out):
        assert torch.equal(got, want)
    assert not torch.equal(run.out[1], Runner(twin_lm).forward("A", prompt(21, seed=1)))  # the hook mattered
    # outside a layer every parameter views the host arena: a paused model reads like a resident one
    assert all(lm.arena.contains(p) for p in locate(lm.model).layers.parameters())
    streamer.close()


def test_resident_decoder_layers_stay_on_the_device_and_the_rest_streams():
    lm, twin = five_layer_pair(resident_layers=2)
    layers = locate(lm.model).layers
    assert lm.arena.layer_ids == [2, 3, 4]
    assert [all(lm.arena.contains(p) for p in layer.parameters()) for layer in layers] == [False] * 2 + [True] * 3
    for (k, a), (_, b) in zip(twin.named_parameters(), lm.model.named_parameters()):
        assert torch.equal(a, b), k
    twin_lm = LoadedModel(name="twin", model=twin, tokenizer=lm.tokenizer, config=twin.config, device=CPU,
                          dtype=torch.float32, is_chat=False, source="preset")
    ref, (run, streamer) = Runner(twin_lm), with_streamer(lm, 2)
    for ids, loads in ((prompt(13), 3 + 2), ([4], 3), (prompt(6, seed=1), 3)):  # cold: + the 2 slots' prefetch
        before = streamer.counters["layer_loads"]
        assert torch.equal(run.forward("a", ids), ref.forward("a", ids))
        assert streamer.counters["layer_loads"] - before == loads
    with pytest.raises(InvalidRequest, match="resident decoder layers"):
        load_model("tiny-llama", device=CPU, home=default_home(), progress=False, offload=True, resident_layers=3)
    streamer.close()


# ---- the slot / fence discipline ----------------------------------------------------------
class RecordingCopier(Copier):
    """Copies synchronously and logs what a GPU would be told: copies (with the fence each waits
    for), waits, and compute fences."""

    def __init__(self):
        self.log: list[tuple] = []
        self._n = 0

    def _fence(self, kind: str):
        self._n += 1
        return (kind, self._n)

    def copy(self, dst, src, chunk_bytes, after):
        dst.copy_(src)
        done = self._fence("copy")
        self.log.append(("copy", dst.data_ptr(), src.data_ptr(), after, done))
        return done

    def compute_fence(self):
        f = self._fence("compute")
        self.log.append(("compute_fence", f))
        return f

    def wait(self, fence):
        self.log.append(("wait", fence))

    def synchronize(self):
        pass


def record_runs(rec: RecordingCopier, layers) -> list:
    """Log ("run", layer, where its weights were) for every layer that really ran (a forward hook:
    the executor's ``begin`` calls layer 0 only to stop it in a pre-hook)."""
    first = {i: next(layers[i].parameters()) for i in range(len(layers))}
    return [layers[i].register_forward_hook(lambda m, a, o, i=i: rec.log.append(("run", i, first[i].data_ptr())))
            for i in range(len(layers))]


def check_discipline(log: list[tuple], streamer: WeightStreamer) -> int:
    """Replay the log with a GPU's semantics; return how many layer runs were checked."""
    ring, size = streamer.ring.data_ptr(), streamer.slot_bytes
    arena = streamer.arena
    layer_at = {arena.buffer.data_ptr() + off: k for k, off in enumerate(arena.offsets)}
    last_copy: dict[int, tuple] = {}      # slot -> (layer, fence)
    last_run: dict[int, int] = {}         # slot -> log position of the last run reading it
    fence_pos: dict = {}
    waited: set = set()
    runs = 0
    for pos, ev in enumerate(log):
        if ev[0] == "copy":
            _, dst, src, after, done = ev
            slot = (dst - ring) // size
            if slot in last_run:  # must start after a compute fence recorded after that slot's last run
                assert after is not None and after[0] == "compute" and fence_pos[after] > last_run[slot], ev
            last_copy[slot] = (layer_at[src], done)
        elif ev[0] == "wait":
            waited.add(ev[1])
        elif ev[0] == "compute_fence":
            fence_pos[ev[1]] = pos
        elif ev[0] == "run":
            _, layer, ptr = ev
            slot = (ptr - ring) // size
            assert last_copy[slot][0] == arena.layer_ids.index(layer), f"layer {layer} ran from a slot holding another"
            assert last_copy[slot][1] in waited, f"layer {layer} ran before its copy was waited for"
            last_run[slot] = pos
            runs += 1
    return runs


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_fence_discipline_with_pauses_and_interleaved_sessions(slots):
    lm, twin = five_layer_pair()
    rec = RecordingCopier()
    run, streamer = with_streamer(lm, slots, copier=rec)
    layers = locate(lm.model).layers
    hooks = record_runs(rec, layers)
    try:
        a = run.start("A", prompt(17), until=2)
        run.forward("B", prompt(5, seed=1))
        run.resume(a)
        for step in range(3):
            run.forward("A", [step + 5])
            b = run.start("B", [step + 9], until=step)
            run.forward("C", prompt(3, seed=step))
            run.resume(b)
    finally:
        for h in hooks:
            h.remove()
    assert check_discipline(rec.log, streamer) == 5 * 11   # every layer run of 11 forwards checked


def test_checker_catches_a_copy_that_does_not_wait_for_the_compute():
    lm, _ = five_layer_pair()

    class Careless(RecordingCopier):
        def copy(self, dst, src, chunk_bytes, after):
            return super().copy(dst, src, chunk_bytes, None)

    rec = Careless()
    run, streamer = with_streamer(lm, 2, copier=rec)
    layers = locate(lm.model).layers
    hooks = record_runs(rec, layers)
    run.forward("A", prompt(4))
    run.forward("A", [5])
    for h in hooks:
        h.remove()
    with pytest.raises(AssertionError):
        check_discipline(rec.log, streamer)


def _slow_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A slow link: the slot first holds garbage (0xFF bytes are NaN in float32), the data lands later."""
    dst.fill_(255)
    time.sleep(0.002)
    dst.copy_(src)


class NoWait(ThreadCopier):
    def wait(self, fence):
        pass


@pytest.mark.parametrize("slots", [1, 2])
def test_compute_waits_for_a_slow_chunked_copy(slots):
    res, st = loaded("tiny-llama"), streamed("tiny-llama")
    ids = prompt(12)
    with torch.inference_mode():
        want = res.model(torch.tensor([ids])).logits[0].float()
    run, streamer = with_streamer(st, slots, copier=ThreadCopier(_slow_copy), chunk=16 << 10)
    assert torch.equal(run.forward("a", ids), want)
    streamer.close()
    # the same run without waiting reads slots before the copies landed: the test can fail
    run, streamer = with_streamer(st, slots, copier=NoWait(_slow_copy), chunk=16 << 10)
    assert not torch.equal(run.forward("a", ids), want)
    streamer.synchronize()
    streamer.close()


def test_a_slot_is_not_overwritten_while_its_layer_runs():
    st = streamed("tiny-llama")
    run, streamer = with_streamer(st, 1, copier=ThreadCopier(_slow_copy), chunk=32 << 10)
    layers = locate(st.model).layers
    seen = {}

    def pre(m, args):
        seen[id(m)] = [p.detach().clone() for p in m.parameters()]

    def post(m, args, out):
        time.sleep(0.03)   # a slow layer: any copy into its slot now would land before it ends
        assert all(torch.equal(a, p) for a, p in zip(seen[id(m)], m.parameters()))

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))]
    try:
        for k in range(2):
            run.forward("a", prompt(6, seed=k))
    finally:
        for h in hooks:
            h.remove()
        streamer.close()
    assert len(seen) == 3


def test_a_failed_copy_is_an_error_and_the_next_forward_recovers():
    res, st = loaded("tiny-llama"), streamed("tiny-llama")
    calls = {"n": 0}

    def flaky(dst, src):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("link down")
        dst.copy_(src)

    run, streamer = with_streamer(st, 2, copier=ThreadCopier(flaky))
    with pytest.raises(RuntimeError, match="link down"):
        run.forward("a", prompt(8))
    with torch.inference_mode():
        want = res.model(torch.tensor([prompt(8, seed=1)])).logits[0].float()
    assert torch.equal(run.forward("b", prompt(8, seed=1)), want)
    assert all(st.arena.contains(p) for p in locate(st.model).layers.parameters())
    streamer.close()


@pytest.mark.parametrize("chunk", [4096, 10_000, None])
def test_chunked_copies_are_exact(chunk):
    res, st = loaded("tiny-llama"), streamed("tiny-llama")
    run, streamer = with_streamer(st, 2, chunk=chunk)
    with torch.inference_mode():
        want = res.model(torch.tensor([prompt(10)])).logits[0].float()
    assert torch.equal(run.forward("a", prompt(10)), want)
    streamer.close()
    assert chunks(10, 4) == [(0, 4), (4, 8), (8, 10)] and chunks(10, None) == [(0, 10)] and chunks(10, 64) == [(0, 10)]


# ---- budget and configuration -------------------------------------------------------------
def test_offload_decision():
    mib = 1 << 20
    assert not should_offload(MemoryConfig(), CPU, 10**12)                   # CPU, no budget: never by itself
    assert should_offload(MemoryConfig(gpu_memory="1GiB"), CPU, 900 * mib)   # leaves no room for KV
    assert not should_offload(MemoryConfig(gpu_memory="1GiB"), CPU, 100 * mib)
    assert should_offload(MemoryConfig(offload=True), CPU, 1)
    assert not should_offload(MemoryConfig(gpu_memory="1GiB", offload=False), CPU, 900 * mib)


def test_budget_counts_resident_parts_plus_slots_and_says_what_to_lower():
    st = streamed("tiny-llama")
    resident = st.weight_bytes(resident_only=True)
    slot = st.arena.max_layer_bytes
    budget = 256 * 2**20 + resident + 2 * slot + 2 * 12288 + 100  # workspace minimum + 2 slots + 2 KV blocks
    assert should_offload(MemoryConfig(gpu_memory=budget), CPU, st.weight_bytes())
    eng = Engine({"m": st}, EngineConfig(memory=MemoryConfig(gpu_memory=budget, stream_slots=2)))
    try:
        rt = eng.runtimes["m"]
        assert rt.device_weight_bytes == resident + 2 * slot
        assert rt.pool.num_blocks >= 2
        out = eng.generate(eng.open_session("m"), GenerateRequest([5, 6, 7], greedy(4)))
        assert out.token_ids == hf_greedy(loaded("tiny-llama").model, [5, 6, 7], 4)
    finally:
        eng.shutdown()
    with pytest.raises(CapacityError, match="stream-slots"):
        Engine({"m": st}, EngineConfig(memory=MemoryConfig(gpu_memory=budget, stream_slots=3)))


def test_default_slots_shrink_to_what_the_budget_holds():
    from djinn.memory.budget import DEFAULT_STREAM_SLOTS, MIN_WORKSPACE_BYTES, STREAM_KV_SHARE

    st = streamed("tiny-llama")
    resident, slot = st.weight_bytes(resident_only=True), st.arena.max_layer_bytes
    assert ModelRuntime.stream_slots_for(st, MemoryConfig()) == min(DEFAULT_STREAM_SLOTS, 3)   # no budget: default
    # room for exactly 2 slots once workspace and the KV share are set aside
    left = int((MIN_WORKSPACE_BYTES + 2.5 * slot) / (1 - STREAM_KV_SHARE)) + 1
    mem = MemoryConfig(gpu_memory=resident + left)
    assert ModelRuntime.stream_slots_for(st, mem) == 2
    eng = Engine({"m": st}, EngineConfig(memory=mem))
    try:
        rt = eng.runtimes["m"]
        assert rt.streamer.num_slots == 2 and rt.device_weight_bytes == resident + 2 * slot
        assert rt.pool.total_bytes <= left - MIN_WORKSPACE_BYTES - 2 * slot   # the KV pool got the rest
    finally:
        eng.shutdown()
    assert ModelRuntime.stream_slots_for(st, MemoryConfig(gpu_memory=resident + left, stream_slots=3)) == 3  # as given


def test_bad_stream_settings_are_clear_errors_and_leave_the_engine_serving():
    st = streamed("tiny-llama")
    eng = Engine({"ok": loaded("tiny-llama")}, EngineConfig(memory=MemoryConfig(kv_blocks=32, stream_slots=0)))
    try:
        with pytest.raises(InvalidRequest, match="stream-slots"):
            eng.add_model("m", st)
        eng.config.memory.stream_slots, eng.config.memory.stream_chunk = 2, "1KiB"
        with pytest.raises(InvalidRequest, match="64 KiB"):
            eng.add_model("m", st)
        assert list(eng.runtimes) == ["ok"]
        assert eng.generate(eng.open_session("ok"), GenerateRequest([1, 2], greedy(2))).token_ids
    finally:
        eng.shutdown()


def test_embedded_client_streams_a_model_that_does_not_fit_its_budget():
    import djinn

    res = loaded("tiny-llama")
    resident = streamed("tiny-llama").weight_bytes(resident_only=True)
    budget = 256 * 2**20 + resident + 3 * streamed("tiny-llama").arena.max_layer_bytes + 4 * 12288
    client = djinn.connect(device="cpu", gpu_memory=budget)
    try:
        sess = client.model("tiny-llama").session()
        out = sess.generate([9, 8, 7, 6], max_new_tokens=6, chat=False, ignore_eos=True)
        assert out.token_ids == hf_greedy(res.model, [9, 8, 7, 6], 6)
        assert "tiny-llama" in client.stats()["streaming"]
    finally:
        client.close()
