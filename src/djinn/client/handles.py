"""What users hold: ``Client``, ``Model`` and ``Session`` handles.

State lives on the server (or the in-process engine); a handle is a name plus a backend.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from djinn.client.backend import Backend
from djinn.client.whitebox import ForwardResult, Paused, from_reply, intervention_requests, wrap_generation
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.engine.sampling import SamplingParams
from djinn.errors import InvalidRequest, SessionClosed

PHASES = ("ACTIVE", "IO_WAIT")


class Session:
    """A server-resident conversation: token history and KV cache stay on the server."""

    def __init__(self, model: "Model", session_id: str):
        self.model = model
        self.id = session_id
        self._closed = False
        self.paused: Paused | None = None   # set on a fork of a paused session: its own paused forward

    @property
    def _backend(self) -> Backend:
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed; open a new one with model.session()")
        return self.model.client._backend

    def generate(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                 chat: bool | None = None, ignore_eos: bool = False, interventions: list | None = None,
                 capture: list[int] | None = None, breakpoint: tuple[int, int] | None = None) -> GenerateResult | Paused:
        """Continue the session with ``prompt`` and generate. Text in (chat-templated for chat
        models unless ``chat=False``) or token ids in; returns text, token ids and timings.

        White-box (docs/whitebox.md): ``interventions=[djinn.Scale(...), djinn.Add(...)]`` apply
        on the server at every step; ``capture=[layers]`` puts those layers' hidden states of
        every computed token in ``out.captured[layer]`` (RemoteTensors); ``breakpoint=(layer,
        step)`` returns a ``Paused`` at that layer of that step (0 = the prefill), whose
        ``resume()`` finishes the generation."""
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        if isinstance(stop, str):
            stop = [stop]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                                top_k=top_k, seed=seed, stop=list(stop or []),
                                stop_token_ids=list(stop_token_ids or []), ignore_eos=ignore_eos)
        params.validate()
        request = GenerateRequest(prompt=prompt, params=params, chat=chat,
                                  interventions=intervention_requests(interventions),
                                  capture=list(capture or []), breakpoint=breakpoint)
        return wrap_generation(self, self._backend.generate(self.id, request))

    def forward(self, input_ids: list[int] | torch.Tensor | str, breakpoint: int | None = None, *,
                interventions: list | None = None) -> ForwardResult | Paused:
        """One forward over ``input_ids``, appended to the session like any forward.

        Without a breakpoint: a ``ForwardResult`` whose ``logits`` [tokens, vocab] stay on the
        server. With ``breakpoint=N``: a ``Paused`` after decoder layer N; its ``activation``
        is a RemoteTensor and ``resume(...)`` finishes the forward."""
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() > 2 or (input_ids.dim() == 2 and input_ids.shape[0] != 1):
                raise InvalidRequest(f"input_ids must be shaped [tokens] or [1, tokens], got {list(input_ids.shape)}")
            input_ids = input_ids.reshape(-1).tolist()
        return from_reply(self, self._backend.forward(self.id, input_ids, breakpoint,
                                                      intervention_requests(interventions)))

    def signal_phase(self, phase: str) -> None:
        """``IO_WAIT``: the client is busy (a tool call), the KV may leave the GPU now.
        ``ACTIVE``: it is coming back; the KV is brought back ahead of the next request."""
        if phase not in PHASES:
            raise InvalidRequest(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")
        self._backend.signal_phase(self.id, phase)

    @contextlib.contextmanager
    def io_wait(self) -> Iterator[None]:
        """``with sess.io_wait(): run_tool()`` signals IO_WAIT before and ACTIVE after."""
        self.signal_phase("IO_WAIT")
        try:
            yield
        finally:
            if not self._closed:
                self.signal_phase("ACTIVE")

    def fork(self) -> "Session":
        """A new session with this one's token history and KV, sharing its KV blocks on the
        server copy-on-write: no copy now, only a block either session later writes is copied.
        Sub-agents, or two edits from one point. A session paused at a breakpoint forks paused
        there: the child's ``paused`` is its own ``Paused``, so ``p.resume(a * 0.9)`` and
        ``child.paused.resume(a2 + v)`` explore two counterfactuals from one prefix."""
        reply = self._backend.fork(self.id)
        child = Session(self.model, reply["session_id"])
        if reply.get("paused") is not None:
            child.paused = Paused(child, reply["paused"])
        return child

    def info(self) -> dict[str, Any]:
        """Where the session's state lives: phase, tokens, KV blocks and their location."""
        return self._backend.session_info(self.id)

    def close(self) -> None:
        """Free everything the session holds on the server. Closing twice is harmless."""
        if not self._closed:
            self.model.client._backend.close_session(self.id)
            self._closed = True

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session({self.id[:8]}, model={self.model.name!r}{', closed' if self._closed else ''})"


class Model:
    """A model handle: config, tokenizer and layer count; the weights stay on the server."""

    def __init__(self, client: "Client", info: dict[str, Any]):
        self.client = client
        self.name: str = info["name"]
        self.config = info["config"]
        self.tokenizer = info["tokenizer"]
        self.num_layers: int = info["num_layers"]
        self.is_chat: bool = info["is_chat"]
        self._module = None

    @property
    def module(self) -> torch.nn.Module:
        """The architecture on torch's meta device: every name and shape, zero weight bytes."""
        if self._module is None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                self._module = AutoModelForCausalLM.from_config(self.config)
        return self._module

    def session(self, session_id: str | None = None) -> Session:
        """Open a new server-resident session, or take up an existing one by its id (one this
        client's principal owns: e.g. opened by an earlier process with the same token)."""
        return Session(self, self.client._backend.open_session(self.name, session_id))

    def __repr__(self) -> str:
        return f"Model({self.name!r}, layers={self.num_layers})"


class Client:
    def __init__(self, backend: Backend):
        self._backend = backend
        self._models: dict[str, Model] = {}

    def model(self, name: str) -> Model:
        if name not in self._models:
            self._models[name] = Model(self, self._backend.model_info(name))
        return self._models[name]

    def stats(self) -> dict[str, Any]:
        """Memory by segment, sessions by phase, swaps and bytes moved."""
        return self._backend.stats()

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
