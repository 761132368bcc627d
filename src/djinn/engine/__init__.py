"""The engine: sessions, scheduling and execution over the memory module."""

from djinn.engine.engine import Engine
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.engine.sampling import SamplingParams
from djinn.engine.session import Phase, Session

__all__ = ["Engine", "GenerateRequest", "GenerateResult", "SamplingParams", "Phase", "Session"]
