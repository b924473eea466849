"""Soft-lock tests train tiny models: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core machine."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield
