"""Typed errors. Every error a user can cause is one of these, raised where the bad input
enters, with a message that says what was wrong and what to do.

Each class has a stable ``code`` so the wire protocol and the HTTP API can carry it and the
client can raise the same class again on its side.
"""

from __future__ import annotations


class DjinnError(Exception):
    """Base class of every error Djinn raises on purpose."""

    code = "djinn_error"
    http_status = 500


class InvalidRequest(DjinnError):
    """The request itself is wrong: bad arguments, empty prompt, out-of-range values."""

    code = "invalid_request"
    http_status = 400


class ModelNotFound(InvalidRequest):
    """A model name that is neither a preset, a cached model, nor a local path."""

    code = "model_not_found"
    http_status = 404


class UnsupportedModel(DjinnError):
    """A model whose architecture Djinn cannot run (e.g. no decoder-layer list)."""

    code = "unsupported_model"
    http_status = 400


class SessionNotFound(DjinnError):
    """The session id is unknown, closed, or belongs to someone else."""

    code = "session_not_found"
    http_status = 404


class SessionClosed(SessionNotFound):
    """The session was closed; open a new one."""

    code = "session_closed"


class CapacityError(DjinnError):
    """Not enough memory (device and host) for the request now; retry later."""

    code = "capacity"
    http_status = 429


class ProtocolError(DjinnError):
    """A frame or message that does not follow the wire protocol."""

    code = "protocol"
    http_status = 400


class AuthError(DjinnError):
    """Missing or wrong token."""

    code = "auth"
    http_status = 401


class Cancelled(DjinnError):
    """The request was cancelled (client gone, server shutting down)."""

    code = "cancelled"
    http_status = 503


_BY_CODE = {
    cls.code: cls
    for cls in (
        DjinnError,
        InvalidRequest,
        ModelNotFound,
        UnsupportedModel,
        SessionNotFound,
        SessionClosed,
        CapacityError,
        ProtocolError,
        AuthError,
        Cancelled,
    )
}


def error_from_code(code: str, message: str) -> DjinnError:
    """Rebuild a typed error from its wire code (unknown codes become DjinnError)."""
    return _BY_CODE.get(code, DjinnError)(message)
