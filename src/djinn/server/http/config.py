"""Settings of the HTTP front end (built at the edge: ``djinn serve`` or the launcher)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HttpConfig:
    api_keys: list[str] | None = None      # None: any key is accepted and only namespaces sessions
    max_body_bytes: int = 4 * 1024 * 1024  # larger bodies get 413
    default_max_tokens: int = 512          # when a request gives no max_tokens (capped by the context)
    max_sessions_per_key: int = 256        # past it the least recently used idle session of that key closes
    max_waiting: int = 64                  # turns queued at once; more get 429
    idempotency_entries: int = 256         # finished requests remembered for client retries
