"""The remote backend: the Backend interface over Djinn's wire protocol to a ``djinn serve``.

One blocking TCP socket (``TCP_NODELAY``: requests are small and latency-bound), one
request at a time (a lock makes a client safe to share between threads; threads that want
to run in parallel open their own clients). Every reply is validated against its op's
schema before anything is read from it, and an error reply raises the same typed
``djinn.errors`` class the server raised.

Connection loss: the call that saw it raises ConnectionClosed (we cannot know whether the
server ran it); the next call reconnects, says hello again and takes up again every
session this client has open (``session_open`` with its id), which the server kept for its
lease (``--lease``, default 300 s). A call interrupted on the client (Ctrl-C, a timeout)
also drops the connection, since the stream would be out of step with its replies.

Model info arrives as plain data: the transformers config as a JSON map (rebuilt with
``AutoConfig.for_model``, from transformers' own registry of model types), the tokenizer
as the files ``save_pretrained`` writes (rebuilt as a ``PreTrainedTokenizerFast``). No
pickle, no code from the server; a chat template is rendered by transformers' sandboxed
Jinja environment.
"""

from __future__ import annotations

import itertools
import secrets
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from djinn.client.backend import Backend
from djinn.engine.requests import GenerateRequest, GenerateResult
from djinn.errors import InvalidRequest, ProtocolError, SessionNotFound
from djinn.protocol import (
    PROTOCOL_VERSION, ConnectionClosed, error_from_wire, make_request, recv_message, send_message, validate_reply,
)

DEFAULT_PORT = 5556
MAX_RECEIVE_BYTES = 16 << 30   # whatever a server announces, a reply is never read past this


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``djinn://host:port``, ``[::1]:port`` or ``host`` (port 5556)."""
    if not isinstance(address, str) or not address.strip():
        raise InvalidRequest(f"address must be 'host:port', got {address!r}")
    text = address.strip().removeprefix("djinn://").removeprefix("tcp://").rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:   # a bare IPv6 address
        host, port = text, str(DEFAULT_PORT)
    else:
        host, port = text, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(f"address must be 'host:port' with a port in 1..65535, got {address!r}")
    return host, int(port)


def _client_tag() -> str:
    import djinn

    return f"djinn-python/{djinn.__version__}"


def rebuild_config(data: dict[str, Any]):
    """A transformers config from its JSON map (the class picked by ``model_type``)."""
    from transformers import AutoConfig, PretrainedConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError):
        return PretrainedConfig.from_dict({**data, **({"model_type": model_type} if model_type else {})})


def rebuild_tokenizer(files: dict[str, bytes]):
    """A fast tokenizer from the files the server's ``save_pretrained`` wrote."""
    from transformers import PreTrainedTokenizerFast

    if "tokenizer.json" not in files:
        return None
    with tempfile.TemporaryDirectory(prefix="djinn-tok-") as tmp:
        for name, data in files.items():   # names were checked by the protocol: no path separators
            (Path(tmp) / name).write_bytes(data)
        return PreTrainedTokenizerFast.from_pretrained(tmp)


def _breakpoint(bp: Any) -> dict | None:
    if bp is None:
        return None
    if isinstance(bp, dict):
        return bp
    if isinstance(bp, int) and not isinstance(bp, bool):
        return {"layer": bp, "step": 0}
    if isinstance(bp, (tuple, list)) and len(bp) == 2:
        return {"layer": bp[0], "step": bp[1]}
    raise InvalidRequest(f"breakpoint must be (layer, step), got {bp!r}")


def _interventions(items: Sequence[dict], tensors: list[torch.Tensor]) -> list[dict]:
    """Interventions on the wire: an ``add``'s vector travels as a payload tensor."""
    out = []
    for x in items:
        x = dict(x)
        if x.get("kind") == "add" and isinstance(x.get("vector"), torch.Tensor):
            tensors.append(x["vector"])
            x["vector"] = len(tensors) - 1
        out.append(x)
    return out


def generation(data: dict[str, Any], session_id: str) -> GenerateResult:
    return GenerateResult(
        token_ids=list(data["token_ids"]), text=data["text"], finish_reason=data["finish_reason"],
        prompt_tokens=data.get("prompt_tokens", 0), cached_tokens=data.get("cached_tokens", 0),
        computed_tokens=data.get("computed_tokens", 0), timings=dict(data["timings"]), session_id=session_id,
        captured={int(k): v for k, v in data["captured"].items()}, paused=data["paused"])


class RemoteBackend(Backend):
    def __init__(self, address: str, token: str | None = None, *, timeout: float | None = None,
                 connect_timeout: float = 10.0, client_key: str | None = None):
        """``timeout``: seconds one request may take (None: no limit, generations can be long)."""
        self.address = address
        self.host, self.port = parse_address(address)
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # who owns our sessions on a server without a token (server/auth.py); kept across reconnects
        self.client_key = client_key or secrets.token_hex(16)
        self.server: dict[str, Any] = {}
        # tensor payload bytes that crossed the wire ("sent": to the server, "received": from it)
        self.tensor_bytes = {"sent": 0, "received": 0}
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._sessions: dict[str, str] = {}     # open session id -> model, to take up after a reconnect
        self._closed = False
        self._connect()

    # ---- connection --------------------------------------------------------------------
    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise ConnectionClosed(f"cannot connect to a Djinn server at {self.host}:{self.port}: {exc}. Is "
                                   "`djinn serve` running there?") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._limit = 1 << 20   # until the server says its limit
        hello = {"version": PROTOCOL_VERSION, "token": self.token, "client": _client_tag(),
                 "client_key": self.client_key}
        try:
            reply, _ = self._exchange("hello", hello, (), sock_timeout=self.connect_timeout)
        except BaseException:
            self._drop()
            raise
        self.server = reply
        self._limit = min(reply.get("max_message_bytes", 256 << 20), MAX_RECEIVE_BYTES)
        sock.settimeout(self.timeout)

    def _reconnect(self) -> None:
        self._connect()
        for sid, model in list(self._sessions.items()):
            try:
                self._exchange("session_open", {"model": model, "session_id": sid}, ())
            except SessionNotFound:
                self._sessions.pop(sid, None)   # its lease ended: calls on it say so

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _exchange(self, op: str, fields: dict, tensors: Sequence[torch.Tensor],
                  sock_timeout: float | None = None) -> tuple[dict, list[torch.Tensor]]:
        """Send one request and read its reply on the current socket (lock held)."""
        sock = self._sock
        rid = next(self._ids)
        sent = sum(t.numel() * t.element_size() for t in tensors)
        if op != "hello" and sent > self.server.get("max_message_bytes", sent):
            raise InvalidRequest(f"this request carries {sent} bytes of tensors; the server accepts messages of at "
                                 f"most {self.server['max_message_bytes']} bytes")
        if sock_timeout is not None:
            sock.settimeout(sock_timeout)
        try:
            send_message(sock, make_request(op, rid, **fields), tensors)
            msg = recv_message(sock, self._limit)
            reply = validate_reply(op, msg.header, msg.tensors)
        except (ConnectionClosed, OSError) as exc:   # OSError includes a timeout
            self._drop()
            raise ConnectionClosed(f"lost the connection to {self.host}:{self.port} during {op}: {exc}. The next "
                                   "call reconnects; the server keeps this client's sessions for its lease") from None
        except BaseException:   # a bad reply, Ctrl-C: the stream is out of step now, start afresh next call
            self._drop()
            raise
        if reply["id"] != rid:
            self._drop()
            if reply["id"] == 0 and not reply["ok"]:   # about the connection: the server hung up
                raise error_from_wire(reply["error"])
            raise ProtocolError(f"reply to request {reply['id']} while waiting for {rid} ({op})")
        if not reply["ok"]:
            raise error_from_wire(reply["error"])
        self.tensor_bytes["sent"] += sent
        self.tensor_bytes["received"] += sum(t.numel() * t.element_size() for t in msg.tensors)
        return reply, msg.tensors

    def call(self, op: str, fields: dict | None = None,
             tensors: Sequence[torch.Tensor] = ()) -> tuple[dict, list[torch.Tensor]]:
        """One request/reply (reconnecting first if the connection was lost)."""
        with self._lock:
            if self._closed:
                raise InvalidRequest("this client is closed; connect again with djinn.connect(...)")
            if self._sock is None:
                self._reconnect()
            return self._exchange(op, fields or {}, tensors)

    # ---- Backend -----------------------------------------------------------------------
    def model_info(self, name: str) -> dict[str, Any]:
        reply, _ = self.call("model_info", {"model": name})
        return {"name": reply["name"], "config": rebuild_config(reply["config"]),
                "tokenizer": rebuild_tokenizer(reply["tokenizer"]["files"]), "num_layers": reply["num_layers"],
                "is_chat": reply["is_chat"]}

    def open_session(self, model: str, session_id: str | None = None) -> str:
        reply, _ = self.call("session_open", {"model": model, "session_id": session_id})
        self._sessions[reply["session_id"]] = model
        return reply["session_id"]

    def generate(self, session_id: str, request: GenerateRequest) -> GenerateResult:
        p = request.params
        tensors: list[torch.Tensor] = []
        fields = {"session_id": session_id, "prompt": request.prompt, "max_new_tokens": p.max_new_tokens,
                  "temperature": float(p.temperature), "top_p": float(p.top_p), "top_k": p.top_k, "seed": p.seed,
                  "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids), "chat": request.chat,
                  "ignore_eos": bool(p.ignore_eos), "interventions": _interventions(request.interventions, tensors),
                  "capture": list(request.capture), "breakpoint": _breakpoint(request.breakpoint)}
        reply, _ = self.call("generate", fields, tensors)
        return generation(reply, session_id)

    def signal_phase(self, session_id: str, phase: str) -> None:
        self.call("signal_phase", {"session_id": session_id, "phase": phase})

    def session_info(self, session_id: str) -> dict[str, Any]:
        return self.call("session_info", {"session_id": session_id})[0]["info"]

    def close_session(self, session_id: str) -> None:
        try:
            self.call("close", {"session_id": session_id})
        finally:
            self._sessions.pop(session_id, None)

    def stats(self) -> dict[str, Any]:
        return self.call("stats")[0]["stats"]

    def fork(self, session_id: str) -> dict[str, Any]:
        reply, _ = self.call("fork", {"session_id": session_id})
        if session_id in self._sessions:   # closed with this client, like the sessions it opened
            self._sessions[reply["session_id"]] = self._sessions[session_id]
        return {"session_id": reply["session_id"], "paused": reply.get("paused")}

    def forward(self, session_id: str, input_ids: list[int], breakpoint: int | None = None,
                interventions: Sequence[dict] = ()) -> dict[str, Any]:
        tensors: list[torch.Tensor] = []
        fields = {"session_id": session_id, "input_ids": list(input_ids), "breakpoint": breakpoint}
        if interventions:
            fields["interventions"] = _interventions(interventions, tensors)
        reply, _ = self.call("forward", fields, tensors)
        return {k: reply[k] for k in ("paused", "logits") if reply.get(k) is not None}

    def resume(self, paused_id: str, activation: torch.Tensor | dict | None = None,
               tensors: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
        if isinstance(activation, torch.Tensor):
            activation, tensors = 0, [activation]
        elif activation is not None and not isinstance(activation, dict):
            raise InvalidRequest(f"resume() takes None, a torch.Tensor or an expression, got {type(activation).__name__}")
        reply, _ = self.call("resume", {"paused_id": paused_id, "activation": activation}, list(tensors))
        if reply.get("generation") is not None:
            return {"generation": generation(reply["generation"], reply["generation"].get("session_id", ""))}
        return {k: reply[k] for k in ("paused", "logits") if reply.get(k) is not None}

    def fetch(self, tensor_id: str, expr: dict | None = None, tensors: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        reply, out = self.call("fetch", {"tensor_id": tensor_id, "expr": expr}, list(tensors))
        return out[reply["tensor"]]

    def release(self, tensor_id: str) -> None:
        self.call("release", {"tensor_id": tensor_id})

    def echo(self, tensors: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Send tensors and get them back (no engine): a health check, and the transport benchmark."""
        reply, out = self.call("echo", {"data": list(range(len(tensors)))}, list(tensors))
        return [out[i] for i in reply.get("data", [])]

    def close(self, keep_sessions: bool = False) -> None:
        """Close the sessions this client opened (unless ``keep_sessions``: then the server
        keeps them for its lease, for another client of the same principal to take up by
        id), then the connection."""
        with self._lock:
            if self._closed:
                return
            try:
                if not keep_sessions and self._sessions:
                    if self._sock is None:
                        self._reconnect()
                    for sid in list(self._sessions):
                        try:
                            self._exchange("close", {"session_id": sid}, ())
                        except SessionNotFound:
                            pass
                        self._sessions.pop(sid, None)
            except ConnectionClosed:
                pass   # the server is gone: its leases end them
            self._closed = True
            self._drop()
