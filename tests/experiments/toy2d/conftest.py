"""Shared fixtures of the toy2d tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is several times faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
