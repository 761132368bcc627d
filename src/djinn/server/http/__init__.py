"""The OpenAI-compatible HTTP front end: ``/v1/chat/completions``, ``/v1/responses``, sessions,
models, health and Prometheus metrics over an in-process engine.

Agents that speak the OpenAI API get server-resident sessions without changing anything: a
request finds its session by header, previous response, the tool-call ids it answers or the
longest common token prefix; a reply ending in tool calls puts its session in IO_WAIT and the
request answering them brings it back. Module map: ``app`` (routes, keys, errors), ``validate``
(bodies), ``render`` (chat template to tokens), ``sessions`` (matching), ``turns`` (one turn),
``toolcalls`` (parsing), ``grammar`` (constrained tool calls), ``outcome`` (response shapes),
``responses`` (Responses API), ``metrics``, ``runner`` (uvicorn thread).
"""

from djinn.server.http.app import create_app
from djinn.server.http.config import HttpConfig
from djinn.server.http.runner import HttpServer, run_http

__all__ = ["HttpConfig", "HttpServer", "create_app", "run_http"]
