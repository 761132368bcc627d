"""fork() on CUDA: shared blocks, copy-on-write copies on the compute stream, parked forks
over the pinned arena and copy streams; tokens and logits equal transformers on the same GPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import loaded, requires_cuda, requires_smollm2
from tests.engine.test_fork import _forks_share_one_prefix, _parked_fork, _two_counterfactuals

pytestmark = [pytest.mark.gpu, requires_cuda]


def test_cuda_32_forks_hold_one_copy_of_the_prefix():
    _forks_share_one_prefix(loaded("tiny-llama", device="cuda", dtype=torch.float32), prefix_len=421, forks=32, n=64)


@requires_smollm2
def test_cuda_32_forks_of_a_2000_token_smollm2_session_each_generate_64_tokens():
    _forks_share_one_prefix(loaded("smollm2-135m", device="cuda", dtype=torch.float32), prefix_len=1999, forks=32,
                            n=64)


def test_cuda_two_counterfactuals_from_one_breakpoint():
    _two_counterfactuals(loaded("tiny-llama", device="cuda", dtype=torch.float32))


def test_cuda_fork_of_a_parked_session():
    _parked_fork(loaded("tiny-llama", device="cuda", dtype=torch.float32))
