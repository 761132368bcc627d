"""Who may connect, and who owns a session.

Policy (principle 9, security by default):
- A server listens on loopback unless told otherwise. Binding any other address without a
  token is refused at start (:func:`check_bind`): anyone who can reach the port could run
  the models and read every session's tensors.
- With a token (``--token`` / ``DJINN_TOKEN``), a connection's first message, ``hello``,
  must carry it; it is compared in constant time (``hmac.compare_digest``) and a wrong or
  missing one closes the connection with an AuthError.

Ownership (the engine's ``owner=``): every session belongs to a *principal*, and the
engine answers SessionNotFound, as for an unknown id, to anyone else, so a session id
alone never lets another party use a session.
- Server with a token: the principal is the token. Every connection that presents it may
  use every session it knows the id of (they share the secret, so they share the trust):
  a worker process may take up a session another process opened.
- Server without a token (loopback only): the principal is the ``client_key`` the client
  sends in hello, a random secret each client object makes for its lifetime, so the same
  client reconnecting gets its sessions back; a connection without one is its own
  principal. Other local processes cannot use a session unless they hold that key.
Principals are one-way hashes, so neither a token nor a key is kept in the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket

from djinn.errors import AuthError, InvalidRequest


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (raises InvalidRequest saying why)."""
    if token is not None and not token:
        raise InvalidRequest("the token is empty; give a long random secret with --token (or DJINN_TOKEN)")
    if token is None and not is_loopback(host):
        raise InvalidRequest(
            f"refusing to listen on {host or 'all addresses'} without a token: anyone who can reach it could run "
            "the models and read every session's tensors. Pass --token SECRET (or set DJINN_TOKEN) and give "
            "clients the same token, or listen on 127.0.0.1 and reach it through an SSH tunnel.")


def check_token(expected: str | None, given: str | None) -> None:
    """Raise AuthError unless ``given`` matches ``expected`` (no token expected: anything goes)."""
    if expected is None:
        return
    if given is None:
        raise AuthError("this server requires a token: djinn.connect(address, token=...) or DJINN_TOKEN")
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise AuthError("wrong token; check the token the server was started with")


def _digest(kind: str, secret: str) -> str:
    return f"{kind}:" + hashlib.sha256(f"djinn-{kind}\0{secret}".encode("utf-8")).hexdigest()[:32]


def principal_for_token(token: str) -> str:
    """The owner of sessions made by holders of ``token`` (shared with the HTTP front end)."""
    return _digest("token", token)


def principal(server_token: str | None, client_key: str | None, connection_id: int) -> str:
    """The engine owner of the sessions a connection opens (see the module docstring)."""
    if server_token is not None:
        return principal_for_token(server_token)
    if client_key is not None:
        return _digest("key", client_key)
    return f"conn:{connection_id}"
