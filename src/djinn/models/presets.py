"""Random-init model presets: a name, a description and a transformers config.

Owns the shapes Djinn can build without any weights on disk. Two tiny models are for
tests (they use the byte-level tokenizer's vocabulary); the rest copy the shapes of real
models, because random weights cost exactly what trained ones cost in memory and time,
which is all a benchmark measures. Invariants every preset keeps:

- ``vocab_size >= BYTE_VOCAB_SIZE``, so every token the byte tokenizer emits is valid;
- ``bos/eos/pad_token_id`` are the byte tokenizer's ids;
- no sliding-window attention: every layer sees the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers import GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig

from djinn.models.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer


@dataclass(frozen=True)
class Preset:
    """A random-init model: ``make_config()`` returns a fresh config each call."""

    name: str
    description: str
    build: Callable[[], PretrainedConfig]

    def make_config(self) -> PretrainedConfig:
        return self.build()


def _token_ids() -> dict[str, int]:
    tok = byte_tokenizer()
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _llama(*, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int, ctx: int,
           tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=ctx,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=tie,
        **_token_ids(),
    )


def _gpt2(*, embd: int, layers: int, heads: int, vocab: int, ctx: int) -> GPT2Config:
    return GPT2Config(
        n_embd=embd, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=ctx,
        initializer_range=0.02, tie_word_embeddings=True, **_token_ids(),
    )


def _mistral_7b() -> MistralConfig:
    # Mistral-7B v0.2 shape: 32k context, rope theta 1e6, no sliding window.
    return MistralConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1_000_000.0, sliding_window=None, initializer_range=0.02,
        tie_word_embeddings=False, **_token_ids(),
    )


def _preset(name: str, description: str, build: Callable[[], PretrainedConfig]) -> tuple[str, Preset]:
    return name, Preset(name, description, build)


PRESETS: dict[str, Preset] = dict(
    [
        _preset("tiny-llama", "test model: Llama, 3 layers, hidden 64, GQA 4/2 heads, byte vocab",
                lambda: _llama(hidden=64, layers=3, heads=4, kv_heads=2, inter=128, vocab=BYTE_VOCAB_SIZE,
                               ctx=512)),
        _preset("tiny-gpt2", "test model: GPT-2, 2 layers, hidden 64, 4 heads, byte vocab",
                lambda: _gpt2(embd=64, layers=2, heads=4, vocab=BYTE_VOCAB_SIZE, ctx=512)),
        _preset("gpt2", "GPT-2 124M shape (12 layers, hidden 768), random weights",
                lambda: _gpt2(embd=768, layers=12, heads=12, vocab=50257, ctx=1024)),
        _preset("llama2-7b", "Llama-2-7B shape (32 layers, hidden 4096, ctx 4096), random weights",
                lambda: _llama(hidden=4096, layers=32, heads=32, kv_heads=32, inter=11008, vocab=32000,
                               ctx=4096)),
        _preset("llama2-7b-16k", "Llama-2-7B shape with a 16k context, random weights",
                lambda: _llama(hidden=4096, layers=32, heads=32, kv_heads=32, inter=11008, vocab=32000,
                               ctx=16384)),
        _preset("llama2-13b", "Llama-2-13B shape (40 layers, hidden 5120, ctx 4096), random weights",
                lambda: _llama(hidden=5120, layers=40, heads=40, kv_heads=40, inter=13824, vocab=32000,
                               ctx=4096)),
        _preset("mistral-7b", "Mistral-7B shape (32 layers, hidden 4096, GQA 32/8, ctx 32k), random weights",
                _mistral_7b),
    ]
)
