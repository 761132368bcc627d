"""``djinn.aconnect``: the same API with awaitable methods, embedded and remote; results equal
the synchronous client's (and transformers', through it)."""

from __future__ import annotations

import asyncio

import pytest
import torch

import djinn
from tests.client.conftest import MODEL

IDS = list(range(40, 57))


@pytest.fixture(scope="module", params=["embedded", "remote"])
def connect_kwargs(request):
    if request.param == "embedded":
        return dict(models=[MODEL], device="cpu", kv_blocks=64)
    return dict(address=request.getfixturevalue("djinn_server").address)


def test_async_client_mirrors_the_sync_one(connect_kwargs):
    sync = djinn.connect(**connect_kwargs)
    try:
        with sync.model(MODEL).session() as s:
            ref = s.generate(IDS, max_new_tokens=6, ignore_eos=True).token_ids
        with sync.model(MODEL).session() as s:
            p = s.forward(IDS, breakpoint=1)
            ref_logits = p.resume(p.activation * 0.5).logits.fetch()
    finally:
        sync.close()

    async def main():
        async with await djinn.aconnect(**connect_kwargs) as client:
            model = await client.model(MODEL)
            assert model.num_layers == 3 and all(p.is_meta for p in model.module.parameters())
            async with await model.session() as sess:
                out = await sess.generate(IDS, max_new_tokens=6, ignore_eos=True, capture=[0])
                assert out.token_ids == ref
                cap = out.captured[0]
                assert isinstance(cap, djinn.client.aio.AsyncRemoteTensor) and cap.shape == (len(IDS) + 5, 64)
                h = await cap.fetch()
                assert torch.equal(await (cap * 2 - 1)[3].fetch(), (h * 2 - 1)[3])
                async with sess.io_wait():
                    assert (await sess.info())["phase"] == "IO_WAIT"
                assert (await sess.info())["phase"] == "ACTIVE"
            async with await model.session() as sess:
                p = await sess.forward(IDS, breakpoint=1)
                assert (p.layer, p.step) == (1, 0) and p.activation.shape == (len(IDS), 64)
                r = await p.resume(p.activation * 0.5)
                assert torch.equal(await r.logits.fetch(), ref_logits)
                with pytest.raises(djinn.InvalidRequest, match="already resumed"):
                    await p.resume()
            async with await model.session() as sess:     # a fork of a paused session, awaited
                p = await sess.forward(IDS, breakpoint=1)
                child = await sess.fork()
                assert isinstance(child.paused, djinn.client.aio.AsyncPaused) and child.paused.layer == 1
                r = await child.paused.resume(child.paused.activation * 0.5)
                assert torch.equal(await r.logits.fetch(), ref_logits)
                await p.resume()
                await child.close()
            # two sessions awaited together
            s1, s2 = await model.session(), await model.session()
            a, b = await asyncio.gather(s1.generate(IDS, max_new_tokens=6, ignore_eos=True),
                                        s2.generate(IDS, max_new_tokens=6, ignore_eos=True))
            assert a.token_ids == b.token_ids == ref
            await s1.close()
            await s2.close()
            assert (await client.stats())["memory"]["tensors"] == 0

    asyncio.run(main())


def test_async_errors_are_the_same_typed_errors(connect_kwargs):
    async def main():
        client = await djinn.aconnect(**connect_kwargs)
        try:
            with pytest.raises(djinn.ModelNotFound):
                await client.model("no-such-model-anywhere")
            model = await client.model(MODEL)
            sess = await model.session()
            with pytest.raises(djinn.InvalidRequest, match="empty prompt"):
                await sess.generate("", max_new_tokens=2)
            await sess.close()
            with pytest.raises(djinn.SessionClosed):
                await sess.generate([1], max_new_tokens=1)
        finally:
            await client.close()

    asyncio.run(main())
