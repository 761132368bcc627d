"""Tokenizers Djinn builds itself, and fix-ups for tokenizers it loads.

Owns the byte-level tokenizer of the random-init presets. No machine here reaches a model
hub, so presets cannot borrow a real tokenizer; instead this module builds one in code:
one token per byte (GPT-2's byte-to-unicode alphabet, BPE with no merges) plus three
special tokens. Invariants:

- byte ``b`` has token id ``b`` (ids 0..255), so a token id *is* the byte it stands for;
- ``<s>``, ``</s>``, ``<pad>`` are ids 256, 257, 258 (``BYTE_VOCAB_SIZE`` tokens in all);
- ``decode(encode(text)) == text`` for every unicode string: nothing is normalised,
  no BOS is added implicitly and decoding never "cleans up" spaces.
"""

from __future__ import annotations

import functools
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (the alphabet
    ByteLevel pre-tokenization emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _build_byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: without merges, splitting into words changes nothing but speed.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The presets' byte-level tokenizer (one shared object; treat it as read-only)."""
    return _build_byte_tokenizer()


def fix_special_tokens(tokenizer: Any, config: Any) -> None:
    """Make the tokenizer's BOS/EOS/PAD agree with the model config, in place.

    transformers' GGUF tokenizer conversion reports SmolLM2's EOS as ``<|im_start|>``
    (the BOS) although the GGUF metadata and the model config say ``<|im_end|>``; stop
    conditions built on ``tokenizer.eos_token_id`` would then never fire. Where they
    disagree the config's id wins. A missing PAD becomes the EOS, as Llama-family chat
    models do.
    """
    for attr in ("bos", "eos", "pad"):
        wanted = getattr(config, f"{attr}_token_id", None)
        allowed = wanted if isinstance(wanted, list) else [wanted]
        allowed = [i for i in allowed if isinstance(i, int) and 0 <= i < len(tokenizer)]
        # A config may list several stop ids (Llama-3); the tokenizer's choice stands if listed.
        if allowed and getattr(tokenizer, f"{attr}_token_id") not in allowed:
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(allowed[0]))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # Cleanup of spaces before punctuation corrupts byte-level BPE output.
    tokenizer.clean_up_tokenization_spaces = False
