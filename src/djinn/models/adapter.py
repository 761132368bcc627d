"""Find the parts of a transformers causal LM that Djinn runs as units.

Djinn runs a model's own code up to its first decoder layer (embeddings, positions, masks),
then the decoder layers one by one (so it can pause, read or rewrite the hidden state between
them), then the final norm and the LM head. This module locates those parts generically, for
any causal LM that keeps its decoder layers in a ``ModuleList``; nothing here is per model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from djinn.errors import UnsupportedModel

_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer", "decoder_layers")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
# Post-processing of the logits that the LM head's caller does and Djinn would skip.
_UNSUPPORTED_CONFIG = ("final_logit_softcapping",)


@dataclass
class Architecture:
    backbone: nn.Module          # the base model whose forward runs embeddings -> layers -> norm
    layers: nn.ModuleList        # decoder layers, run by Djinn one at a time
    final_norm: nn.Module | None
    lm_head: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def locate(model: nn.Module) -> Architecture:
    """Locate backbone, decoder layers, final norm and head; UnsupportedModel if impossible."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    for key in _UNSUPPORTED_CONFIG:
        if config is not None and getattr(config, key, None):
            raise UnsupportedModel(f"{name}: config.{key} post-processes logits; Djinn does not support it yet")
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise UnsupportedModel(f"{name} has no base model: Djinn needs a transformers *ForCausalLM")
    n_layers = getattr(config, "num_hidden_layers", None)
    layers = None
    for attr in _LAYER_LIST_NAMES:
        cand = getattr(backbone, attr, None)
        if isinstance(cand, nn.ModuleList) and len(cand) > 0 and (n_layers is None or len(cand) == n_layers):
            layers = cand
            break
    if layers is None:
        raise UnsupportedModel(
            f"{name}: no list of decoder layers found on {type(backbone).__name__} "
            f"(looked for {', '.join(_LAYER_LIST_NAMES)}); Djinn supports causal LMs that keep their layers in a list"
        )
    norm = next((getattr(backbone, a) for a in _NORM_NAMES if isinstance(getattr(backbone, a, None), nn.Module)), None)
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedModel(f"{name} has no output embeddings (LM head)")
    return Architecture(backbone=backbone, layers=layers, final_norm=norm, lm_head=head)
