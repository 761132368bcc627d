"""The embedded backend: an engine in this process behind the client interface."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from djinn.client.backend import Backend
from djinn.config import Config
from djinn.engine import Engine, GenerateRequest, GenerateResult
from djinn.errors import InvalidRequest
from djinn.engine.startup import load_into, resolve_device, resolve_dtype  # noqa: F401 (re-exported)


class EmbeddedBackend(Backend):
    """Loads models on first use (or up front) into one in-process engine."""

    def __init__(self, config: Config, engine: Engine | None = None):
        self.config = config
        self.device = resolve_device(config.engine.device)
        self.dtype = resolve_dtype(config.engine.dtype, self.device)
        self.engine = engine or Engine(config=config.engine)
        self._owns_engine = engine is None
        # tensor bytes that crossed the client boundary (the remote backend counts wire bytes):
        # "sent" = client tensors given to the engine, "received" = tensors fetched from it
        self.tensor_bytes = {"sent": 0, "received": 0}
        for name in config.models:
            self._ensure(name)

    def _ensure(self, name: str) -> None:
        load_into(self.engine, name, self.config, self.device, self.dtype)

    def model_info(self, name: str) -> dict[str, Any]:
        self._ensure(name)
        rt = self.engine.runtimes[name]
        return {"name": name, "config": rt.loaded.config, "tokenizer": rt.tokenizer,
                "num_layers": rt.arch.num_layers, "is_chat": rt.loaded.is_chat}

    def open_session(self, model: str, session_id: str | None = None) -> str:
        self._ensure(model)
        if session_id is not None:   # an existing session, by id (raises SessionNotFound if gone)
            if self.engine.session_info(session_id)["model"] != model:
                raise InvalidRequest(f"session {session_id} is a session of another model, not {model!r}")
            return session_id
        return self.engine.open_session(model)

    def generate(self, session_id: str, request: GenerateRequest) -> GenerateResult:
        self._count("sent", [x["vector"] for x in request.interventions if isinstance(x.get("vector"), torch.Tensor)])
        return self.engine.generate(session_id, request)

    def forward(self, session_id: str, input_ids: list[int], breakpoint: int | None = None,
                interventions: Sequence[dict] = ()) -> dict[str, Any]:
        self._count("sent", [x["vector"] for x in interventions if isinstance(x.get("vector"), torch.Tensor)])
        return self.engine.forward(session_id, input_ids, breakpoint, list(interventions))

    def resume(self, paused_id: str, activation: torch.Tensor | dict | None = None,
               tensors: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
        self._count("sent", [activation] if isinstance(activation, torch.Tensor) else tensors)
        return self.engine.resume(paused_id, activation, list(tensors))

    def fetch(self, tensor_id: str, expr: dict | None = None, tensors: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._count("sent", tensors)
        out = self.engine.fetch(tensor_id, expr, list(tensors))
        self._count("received", [out])
        return out

    def release(self, tensor_id: str) -> None:
        self.engine.release(tensor_id)

    def _count(self, direction: str, tensors) -> None:
        self.tensor_bytes[direction] += sum(t.numel() * t.element_size() for t in tensors)

    def signal_phase(self, session_id: str, phase: str) -> None:
        self.engine.signal_phase(session_id, phase)

    def session_info(self, session_id: str) -> dict[str, Any]:
        return self.engine.session_info(session_id)

    def close_session(self, session_id: str) -> None:
        self.engine.close_session(session_id)

    def fork(self, session_id: str) -> dict[str, Any]:
        return self.engine.fork(session_id)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def close(self) -> None:
        if self._owns_engine:
            self.engine.shutdown()
