"""Test settings shared by every test (the helper models live in tiny_models.py)."""

import pytest
import torch

# Tiny tensors: one thread is faster, and far faster on a busy 2-core machine where
# intra-op threads fight other processes.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread again for every test file, whatever a test before it set (``bench --threads``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
