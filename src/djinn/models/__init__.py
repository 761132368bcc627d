"""Models: what a name means (registry), random-init shapes (presets), loading weights onto
a device (loading), fetching real models into the cache (pull) and the presets' tokenizer.

Everything else in Djinn sees a model only as a ``LoadedModel``.
"""

from djinn.models.loading import LoadedModel, build_random, load_model
from djinn.models.presets import PRESETS, Preset
from djinn.models.pull import SOURCES as PULLABLE
from djinn.models.pull import PullError, pull
from djinn.models.registry import cache_dir, list_models
from djinn.models.tokenizer import byte_tokenizer

__all__ = [
    "PRESETS",
    "PULLABLE",
    "LoadedModel",
    "Preset",
    "PullError",
    "build_random",
    "byte_tokenizer",
    "cache_dir",
    "list_models",
    "load_model",
    "pull",
]
