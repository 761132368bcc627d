"""The public-API tests run twice: against the embedded client and against a real
``djinn serve`` subprocess on loopback (the session-wide ``djinn_server``)."""

from __future__ import annotations

import pytest

import djinn
from tests.conftest import loaded

MODEL = "tiny-llama"


@pytest.fixture(scope="module", params=["embedded", "remote"])
def client(request):
    if request.param == "embedded":
        c = djinn.connect(models=[MODEL], device="cpu", kv_blocks=128)
    else:
        c = djinn.connect(request.getfixturevalue("djinn_server").address)
    yield c
    c.close()


def is_remote(client) -> bool:
    from djinn.client.remote import RemoteBackend

    return isinstance(client._backend, RemoteBackend)


def oracle_model(client, name: str = MODEL):
    """transformers' own module with the weights the client's engine serves: the engine's
    model in process, or the same preset (same seed, so bit-identical weights) loaded here."""
    if is_remote(client):
        return loaded(name).model
    return client._backend.engine.runtimes[name].loaded.model
