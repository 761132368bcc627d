"""Clients: ``connect()`` returns an embedded client, ``connect("host:port")`` a remote one."""

from __future__ import annotations

import os
from pathlib import Path

from djinn.client.aio import AsyncClient, AsyncModel, AsyncSession, aconnect
from djinn.client.handles import Client, Model, Session
from djinn.client.remote_tensor import RemoteTensor
from djinn.client.whitebox import Add, ForwardResult, Paused, Scale
from djinn.config import Config, EngineConfig, MemoryConfig, default_home


def connect(address: str | None = None, token: str | None = None, *, models: list[str] | None = None,
            device: str = "auto", dtype: str = "auto", gpu_memory=None, host_memory=None,
            policy: str = "semantic", home: str | Path | None = None, kv_blocks: int | None = None,
            block_size: int = 16, seed: int = 0, offload: bool | None = None, stream_slots: int | None = None,
            stream_chunk=None, prefix_sharing: bool = True) -> Client:
    """Connect to Djinn.

    With no address, starts an engine in this process (embedded mode): models load on first
    ``client.model(name)`` (or up front with ``models=[...]``). The keyword options configure
    that engine (``offload``/``stream_slots``/``stream_chunk``: weight streaming, see MemoryConfig;
    ``prefix_sharing``: store identical KV prefixes of sessions once, docs/fork.md).
    With ``"host:port"``, connects to a running ``djinn serve``; ``token`` is the
    server's ``--token`` (default: the ``DJINN_TOKEN`` environment variable).
    """
    if address is not None:
        from djinn.client.remote import RemoteBackend

        if token is None:
            token = os.environ.get("DJINN_TOKEN") or None
        return Client(RemoteBackend(address, token=token))
    from djinn.client.embedded import EmbeddedBackend

    mem = MemoryConfig(gpu_memory=gpu_memory, host_memory=host_memory, policy=policy, kv_blocks=kv_blocks,
                       block_size=block_size, offload=offload, stream_slots=stream_slots, stream_chunk=stream_chunk)
    config = Config(models=list(models or []), home=Path(home) if home else default_home(),
                    engine=EngineConfig(device=device, dtype=dtype, seed=seed, prefix_sharing=prefix_sharing,
                                        memory=mem))
    return Client(EmbeddedBackend(config))


__all__ = ["connect", "aconnect", "AsyncClient", "AsyncModel", "AsyncSession", "Client", "Model", "Session",
           "RemoteTensor", "Paused", "ForwardResult", "Scale", "Add"]
