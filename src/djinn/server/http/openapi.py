"""The HTTP API as an OpenAPI 3.0 document, for schema-driven fuzzing (schemathesis).

The app reads its bodies as raw JSON and validates them field by field (validate.py), so
FastAPI cannot infer their schemas; this document states them by hand: the endpoints, their
path parameters, and the request bodies with the fields validate.py and responses.py
understand (``CHAT_FIELDS`` / ``FIELDS``). A test checks that every route of the app is
described here, so a new endpoint cannot silently escape the fuzzing.

The schemas describe what a *valid* request looks like; the fuzzer also sends what does not
match them (schemathesis' negative mode), and the API must answer every such request with a
4xx, never a 5xx.
"""

from __future__ import annotations

from typing import Any

_CONTENT = {"anyOf": [{"type": "string"},
                      {"type": "array", "items": {"type": "object", "properties": {
                          "type": {"type": "string", "enum": ["text", "input_text", "output_text"]},
                          "text": {"type": "string"}}, "required": ["type", "text"]}}]}
# a tool result must answer a call an earlier assistant message made: a context rule a schema
# cannot state, so tool messages are left to the negative cases
_MESSAGE = {"oneOf": [
    {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user"]}, "content": _CONTENT,
        "name": {"type": "string"}}},
    {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
        "role": {"type": "string", "enum": ["assistant"]}, "content": _CONTENT,
        "tool_calls": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "properties": {"name": {"type": "string"},
                                                          "arguments": {"type": "string"}}}}}}}},
]}
_FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "description": {"type": "string"},
    "parameters": {"type": "object"}}}
_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"type": "string", "enum": ["function"]}, "function": _FUNCTION}}
_STOP = {"nullable": True, "anyOf": [{"type": "string", "minLength": 1},
                                     {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}}]}
_TOOL_CHOICE = {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                          {"type": "object", "properties": {"type": {"type": "string", "enum": ["function"]},
                                                            "function": {"type": "object", "properties": {
                                                                "name": {"type": "string"}}}}}]}
_SAMPLING = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
    "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1, "nullable": True},
    "user": {"type": "string"}, "prompt_cache_key": {"type": "string"}, "djinn_session": {"type": "string"},
    "tools": {"type": "array", "items": _TOOL}, "tool_choice": _TOOL_CHOICE,
    "parallel_tool_calls": {"type": "boolean"},
}
CHAT_BODY = {"type": "object", "required": ["model", "messages"], "additionalProperties": False, "properties": {
    "model": {"type": "string"},
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "stream": {"type": "boolean"},
    "stop": _STOP,
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "seed": {"type": "integer", "minimum": -2**63, "maximum": 2**64 - 1, "nullable": True},
    "n": {"type": "integer", "enum": [1]},
    **_SAMPLING,
}}
RESPONSES_BODY = {"type": "object", "required": ["model", "input"], "additionalProperties": False, "properties": {
    "model": {"type": "string"},
    "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]}, "content": _CONTENT,
        "type": {"type": "string"}}}}]},
    "instructions": {"type": "string", "nullable": True},
    "previous_response_id": {"type": "string", "nullable": True},
    "store": {"type": "boolean"},
    "max_output_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "metadata": {"type": "object", "nullable": True},
    "stream": {"type": "boolean", "enum": [False]},
    **_SAMPLING,
}}


def _op(summary: str, body: dict | None = None, params: tuple[str, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "OK"}, "400": {"description": "invalid request"},
        "401": {"description": "missing or wrong API key"}, "404": {"description": "not found"},
        "413": {"description": "body too large"}, "429": {"description": "over capacity; retry later"}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    return op


def openapi_schema(models: list[str] | None = None) -> dict[str, Any]:
    """The document; ``models``: the names this server loaded (the ``model`` fields' enum)."""
    import copy

    chat, responses = copy.deepcopy(CHAT_BODY), copy.deepcopy(RESPONSES_BODY)
    if models:
        for body in (chat, responses):
            body["properties"]["model"]["enum"] = list(models)
    return {
        "openapi": "3.0.3",
        "info": {"title": "Djinn OpenAI-compatible API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {"post": _op("a chat turn", chat)},
            "/v1/responses": {"post": _op("a Responses API turn", responses)},
            "/v1/responses/{rid}": {"get": _op("a stored response", params=("rid",)),
                                    "delete": _op("delete a stored response", params=("rid",))},
            "/v1/models": {"get": _op("the loaded models")},
            "/v1/models/{name}": {"get": _op("one model", params=("name",))},
            "/v1/sessions": {"get": _op("this key's sessions")},
            "/v1/sessions/{sid}": {"get": _op("one session", params=("sid",)),
                                   "delete": _op("close a session", params=("sid",))},
            "/health": {"get": _op("liveness")},
            "/metrics": {"get": _op("Prometheus metrics")},
        },
    }
