"""Fixtures of the split tests: synthetic devices with a fast stored device key, and a small data set."""

from __future__ import annotations

import os

import pytest
import torch

from chiplock.fingerprint import Enrollment
from chiplock.keys import INSECURE_FAST, KdfParams
from chiplock.profile import DeviceProfile


def make_device() -> DeviceProfile:
    """A synthetic device (80 estimated bits, random material), as tests/test_license.py builds one."""
    e = Enrollment(source="precision", helper={"suite": 2, "device": "cpu"}, material=os.urandom(32),
                   entropy_bits=80.0)
    return DeviceProfile(enrollments=(e,)).with_device_key(KdfParams(**INSECURE_FAST))


@pytest.fixture(scope="module")
def device() -> DeviceProfile:
    return make_device()


def blobs(n_train: int = 1024, n_test: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ten noisy 8x8 class prototypes: learnable in a few steps, not perfectly (so accuracies can differ)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 8, 8, generator=g)

    def draw(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return (protos[y] + 0.7 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 2), y

    x, y = draw(n_train)
    xt, yt = draw(n_test)
    return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}
