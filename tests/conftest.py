"""Suite-wide settings."""

import os

import pytest
import torch

# VITATLAS_TEST_THREADS=2 runs the suite with two intra-op threads (`make test-portability` does), to catch
# tests that silently depend on one thread's summation order.
TEST_THREADS = int(os.environ.get("VITATLAS_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def _torch_threads():
    """Test problems are small: one intra-op thread is as fast as two, and on a busy 2-core machine two
    threads spin-wait on each other (measured up to 10x slower). Benchmarks, not tests, measure speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)
