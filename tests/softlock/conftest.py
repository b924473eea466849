"""Soft-lock tests train tiny models: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core machine."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
