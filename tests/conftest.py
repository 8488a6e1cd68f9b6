"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Test problems are small: one intra-op thread is as fast as two, and on a busy 2-core machine two
    threads spin-wait on each other (measured up to 10x slower). Benchmarks, not tests, measure speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
