"""The seam between the user-facing handles and where the engine runs.

``EmbeddedBackend`` calls an in-process engine; the remote backend sends the same calls over
the wire protocol. The handles in ``djinn.client.handles`` only talk to a ``Backend``, so the
embedded and the remote client behave the same by construction (and one test suite runs
against both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from djinn.engine.requests import GenerateRequest, GenerateResult


class Backend(ABC):
    @abstractmethod
    def model_info(self, name: str) -> dict[str, Any]:
        """``{"name", "config" (PretrainedConfig), "tokenizer", "num_layers", "is_chat"}``."""

    @abstractmethod
    def open_session(self, model: str) -> str: ...

    @abstractmethod
    def generate(self, session_id: str, request: GenerateRequest) -> GenerateResult: ...

    @abstractmethod
    def signal_phase(self, session_id: str, phase: str) -> None: ...

    @abstractmethod
    def session_info(self, session_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def close_session(self, session_id: str) -> None: ...

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def close(self) -> None: ...
