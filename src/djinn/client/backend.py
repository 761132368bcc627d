"""The seam between the user-facing handles and where the engine runs.

``EmbeddedBackend`` calls an in-process engine; the remote backend sends the same calls over
the wire protocol. The handles in ``djinn.client.handles`` only talk to a ``Backend``, so the
embedded and the remote client behave the same by construction (and one test suite runs
against both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from djinn.engine.requests import GenerateRequest, GenerateResult


class Backend(ABC):
    @abstractmethod
    def model_info(self, name: str) -> dict[str, Any]:
        """``{"name", "config" (PretrainedConfig), "tokenizer", "num_layers", "is_chat"}``."""

    @abstractmethod
    def open_session(self, model: str, session_id: str | None = None) -> str:
        """A new session of ``model``, or with ``session_id`` that existing session (after a
        reconnect, or from another process of the same principal); SessionNotFound if gone."""

    @abstractmethod
    def generate(self, session_id: str, request: GenerateRequest) -> GenerateResult: ...

    @abstractmethod
    def signal_phase(self, session_id: str, phase: str) -> None: ...

    @abstractmethod
    def session_info(self, session_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def close_session(self, session_id: str) -> None: ...

    @abstractmethod
    def fork(self, session_id: str) -> dict[str, Any]:
        """A new session sharing ``session_id``'s history and KV (copy-on-write):
        ``{"session_id", "paused"}``; ``paused`` is the child's paused_ref (as in ``forward``)
        when the session is paused at a breakpoint, else None."""

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    # ---- white-box (docs/whitebox.md). Plain data only: ids, tensors, expression trees as
    # dicts, handles as {"id", "shape", "dtype", "session_id"}; the protocol's forward /
    # resume / fetch / release messages carry exactly these.
    @abstractmethod
    def forward(self, session_id: str, input_ids: list[int], breakpoint: int | None = None,
                interventions: Sequence[dict] = ()) -> dict[str, Any]:
        """``{"logits": tensor_ref}`` or, with a breakpoint, ``{"paused": paused_ref}``
        (``{"paused_id", "layer", "step", "activation": tensor_ref}``)."""

    @abstractmethod
    def resume(self, paused_id: str, activation: torch.Tensor | dict | None = None,
               tensors: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
        """Continue a paused forward or generation. ``activation``: None (unchanged), a tensor,
        or an expression tree whose ``{"tensor": i}`` leaves index ``tensors``. Returns
        ``{"logits": tensor_ref}`` (a forward) or ``{"generation": GenerateResult}``."""

    @abstractmethod
    def fetch(self, tensor_id: str, expr: dict | None = None, tensors: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """A server-side tensor, or the value of ``expr`` over tensors of its session, on the CPU."""

    @abstractmethod
    def release(self, tensor_id: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
