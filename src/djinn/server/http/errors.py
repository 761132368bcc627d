"""OpenAI-style error bodies and the mapping from Djinn's typed errors to HTTP statuses.

Every failure a client can cause leaves as ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status; anything unexpected is a 500 with a generic message (the traceback goes to
the server log, never to the client).
"""

from __future__ import annotations

from djinn.errors import CapacityError, DjinnError, SessionNotFound


class APIError(Exception):
    """An error raised by the HTTP layer itself, with the status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, "invalid_request_error", param, code)


_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                   413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def from_djinn(exc: DjinnError) -> APIError:
    """The HTTP face of an engine error."""
    status = exc.http_status
    if isinstance(exc, SessionNotFound):
        status = 404
    elif isinstance(exc, CapacityError):
        status = 429
    if status >= 500 and exc.code != "cancelled":
        status = 500
    return APIError(status, str(exc), _TYPE_BY_STATUS.get(status, "server_error"), None, exc.code)


def body(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
