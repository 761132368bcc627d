"""Djinn: a GPU server that many interactive LLM sessions share.

Weights load once; each session's token history and KV cache live on the server; clients say
when they wait for tools so memory moves ahead of need. See README.md and docs/.
"""

from djinn.client import Add, Client, ForwardResult, Model, Paused, RemoteTensor, Scale, Session, connect
from djinn.engine.requests import GenerateResult
from djinn.errors import (
    AuthError,
    Cancelled,
    CapacityError,
    DjinnError,
    InvalidRequest,
    ModelNotFound,
    ProtocolError,
    SessionClosed,
    SessionNotFound,
    UnsupportedModel,
)

__version__ = "0.1.0"

__all__ = [
    "connect", "Client", "Model", "Session", "GenerateResult",
    "Paused", "RemoteTensor", "ForwardResult", "Scale", "Add",
    "DjinnError", "InvalidRequest", "ModelNotFound", "UnsupportedModel", "SessionNotFound", "SessionClosed",
    "CapacityError", "ProtocolError", "AuthError", "Cancelled",
]
