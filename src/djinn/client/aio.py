"""``djinn.aconnect``: the client with awaitable methods, for asyncio programs (agents).

How: a thin layer over the synchronous client. Each ``AsyncClient`` owns one worker
thread; every call that talks to the backend runs there (``run_in_executor``), so the event
loop never blocks and calls of one client run in the order they were awaited. What needs
no round trip stays synchronous: a model's ``config``/``tokenizer``/``module``, a remote
tensor's ``shape``/``dtype`` and its lazy arithmetic (``p.activation * 0.9``).

Why not a second, asyncio-native transport: the engine runs one request at a time, so a
connection multiplexing many requests would not finish them sooner today, and one
implementation of the handle logic (``handles.py``, ``whitebox.py``) is one set of
semantics. Tasks that want their requests to overlap on the wire open one client each.

    async with await djinn.aconnect("localhost:5556") as client:
        model = await client.model("smollm2-135m")
        async with await model.session() as sess:
            out = await sess.generate("What is 2+2?", max_new_tokens=32)
            p = await sess.forward(ids, breakpoint=6)
            r = await p.resume(p.activation * 0.9)
            logits = await r.logits.fetch()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import torch

from djinn.client.handles import Client, Model, Session
from djinn.client.remote_tensor import RemoteTensor
from djinn.client.whitebox import ForwardResult, Paused
from djinn.engine.requests import GenerateResult


class _Runner:
    """One worker thread per client: blocking calls run there, in the order awaited."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="djinn-aio")

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


def _unwrap(x: Any) -> Any:
    return x._t if isinstance(x, AsyncRemoteTensor) else x


class AsyncRemoteTensor:
    """A ``RemoteTensor`` whose ``fetch()``/``release()`` are awaitable; arithmetic is lazy as before."""

    __slots__ = ("_t", "_run")

    def __init__(self, tensor: RemoteTensor, run: _Runner):
        self._t, self._run = tensor, run

    def _wrap(self, t: RemoteTensor) -> "AsyncRemoteTensor":
        return AsyncRemoteTensor(t, self._run)

    id = property(lambda self: self._t.id)
    is_handle = property(lambda self: self._t.is_handle)
    session_id = property(lambda self: self._t.session_id)
    shape = property(lambda self: self._t.shape)
    dtype = property(lambda self: self._t.dtype)
    ndim = property(lambda self: self._t.ndim)

    def size(self, dim: int | None = None):
        return self._t.size(dim)

    def numel(self) -> int:
        return self._t.numel()

    async def fetch(self) -> torch.Tensor:
        return await self._run(self._t.fetch)

    async def release(self) -> None:
        await self._run(self._t.release)

    def __add__(self, o): return self._wrap(self._t + _unwrap(o))
    def __radd__(self, o): return self._wrap(self._t.__radd__(_unwrap(o)))
    def __sub__(self, o): return self._wrap(self._t - _unwrap(o))
    def __rsub__(self, o): return self._wrap(self._t.__rsub__(_unwrap(o)))
    def __mul__(self, o): return self._wrap(self._t * _unwrap(o))
    def __rmul__(self, o): return self._wrap(self._t.__rmul__(_unwrap(o)))
    def __truediv__(self, o): return self._wrap(self._t / _unwrap(o))
    def __rtruediv__(self, o): return self._wrap(self._t.__rtruediv__(_unwrap(o)))
    def __neg__(self): return self._wrap(-self._t)
    def __getitem__(self, key): return self._wrap(self._t[key])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        run = next(a._run for a in args if isinstance(a, AsyncRemoteTensor))
        out = func(*[_unwrap(a) for a in args], **(kwargs or {}))
        return AsyncRemoteTensor(out, run) if isinstance(out, RemoteTensor) else out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._t, name)   # RemoteTensor names what is supported

    def __repr__(self) -> str:
        return "Async" + repr(self._t)


class AsyncPaused:
    """A forward stopped after ``layer``; ``await p.resume(...)`` finishes it (see ``djinn.Paused``)."""

    def __init__(self, paused: Paused, run: _Runner):
        self._p, self._run = paused, run
        self.id, self.layer, self.step = paused.id, paused.layer, paused.step
        self.activation = AsyncRemoteTensor(paused.activation, run)

    async def resume(self, activation: torch.Tensor | RemoteTensor | AsyncRemoteTensor | None = None):
        return _wrap(await self._run(self._p.resume, _unwrap(activation)), self._run)

    def __repr__(self) -> str:
        return "Async" + repr(self._p)


class AsyncForwardResult:
    def __init__(self, result: ForwardResult, run: _Runner):
        self.logits = AsyncRemoteTensor(result.logits, run)


def _wrap(result: Any, run: _Runner) -> Any:
    if isinstance(result, Paused):
        return AsyncPaused(result, run)
    if isinstance(result, ForwardResult):
        return AsyncForwardResult(result, run)
    if isinstance(result, GenerateResult):
        result.captured = {k: AsyncRemoteTensor(v, run) if isinstance(v, RemoteTensor) else v
                           for k, v in result.captured.items()}
    return result


class AsyncSession:
    """A server-resident session (see ``djinn.Session``) with awaitable methods."""

    def __init__(self, session: Session, run: _Runner):
        self.session, self._run = session, run
        self.id = session.id
        self.paused: AsyncPaused | None = None   # set on a fork of a paused session

    async def generate(self, prompt, max_new_tokens: int = 64, **kwargs: Any):
        return _wrap(await self._run(self.session.generate, prompt, max_new_tokens, **kwargs), self._run)

    async def forward(self, input_ids, breakpoint: int | None = None, **kwargs: Any):
        return _wrap(await self._run(self.session.forward, input_ids, breakpoint, **kwargs), self._run)

    async def signal_phase(self, phase: str) -> None:
        await self._run(self.session.signal_phase, phase)

    @contextlib.asynccontextmanager
    async def io_wait(self) -> AsyncIterator[None]:
        """``async with sess.io_wait(): await run_tool()``: IO_WAIT before, ACTIVE after."""
        await self.signal_phase("IO_WAIT")
        try:
            yield
        finally:
            if not self.session._closed:
                await self.signal_phase("ACTIVE")

    async def info(self) -> dict[str, Any]:
        return await self._run(self.session.info)

    async def fork(self) -> "AsyncSession":
        """See ``djinn.Session.fork``: a child sharing this session's KV copy-on-write."""
        child = AsyncSession(await self._run(self.session.fork), self._run)
        child.paused = _wrap(child.session.paused, self._run)
        return child

    async def close(self) -> None:
        await self._run(self.session.close)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        return "Async" + repr(self.session)


class AsyncModel:
    """A model handle (see ``djinn.Model``): config, tokenizer and ``module`` are local."""

    def __init__(self, model: Model, run: _Runner):
        self.model, self._run = model, run
        self.name, self.config, self.tokenizer = model.name, model.config, model.tokenizer
        self.num_layers, self.is_chat = model.num_layers, model.is_chat

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module

    async def session(self, session_id: str | None = None) -> AsyncSession:
        return AsyncSession(await self._run(self.model.session, session_id), self._run)

    def __repr__(self) -> str:
        return "Async" + repr(self.model)


class AsyncClient:
    def __init__(self, client: Client, run: _Runner):
        self.client, self._run = client, run

    async def model(self, name: str) -> AsyncModel:
        return AsyncModel(await self._run(self.client.model, name), self._run)

    async def stats(self) -> dict[str, Any]:
        return await self._run(self.client.stats)

    async def close(self) -> None:
        try:
            await self._run(self.client.close)
        finally:
            self._run.shutdown()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def aconnect(address: str | None = None, token: str | None = None, **kwargs: Any) -> AsyncClient:
    """Like ``djinn.connect`` (same arguments), for asyncio: ``client = await djinn.aconnect(...)``."""
    from djinn.client import connect

    run = _Runner()
    try:
        return AsyncClient(await run(connect, address, token, **kwargs), run)
    except BaseException:
        run.shutdown()
        raise
