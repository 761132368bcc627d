"""Automatic prefix sharing on CUDA: batched prefill and decode (CUDA graphs), parks and restores
over the pinned arena and copy streams, with tokens equal to an unshared run on the same GPU
and to transformers."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import loaded, requires_cuda
from tests.engine.test_prefix_sharing import (all_resident_stores_the_prefix_once, restore_and_rebuild_reshare,
                                              shared_run_equals, steered_sessions_do_not_share, unshared_run)

pytestmark = [pytest.mark.gpu, requires_cuda]


def _lm():
    return loaded("tiny-llama", device="cuda", dtype=torch.float32)


def test_cuda_200_sessions_sharing_a_system_prompt_under_parking_equal_unshared_runs():
    lm = _lm()
    ref, stats, shared_seen = unshared_run(lm)
    assert set(shared_seen) == {0} and stats["sharing"]["prefix_hits"] == 0
    shared_run_equals(lm, ref)
    all_resident_stores_the_prefix_once(lm, ref)


def test_cuda_steered_sessions_do_not_share():
    steered_sessions_do_not_share(_lm())


def test_cuda_restore_and_rebuild_reshare():
    restore_and_rebuild_reshare(_lm())
