"""Data splits and training: deterministic, disjoint, frozen backbone, accuracy thresholds on digits8."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

pytest.importorskip("sklearn", reason="digits8 needs scikit-learn (the demo extra)")

from chiplock.enclave.models import TeeSliceNet
from chiplock.enclave.partition import HostModel, LocalCall, build_secure, split
from chiplock.enclave.train import (
    evaluate,
    finetune_victim,
    load_splits,
    net_spec_for,
    pretrain_public,
    train_teeslice,
)
from chiplock.errors import UnsupportedConfig


@pytest.fixture(scope="module")
def splits():
    return load_splits("digits8", seed=0)


@pytest.fixture(scope="module")
def tiny(splits):
    return net_spec_for(splits, widths=(4, 8), fc=16)


@pytest.fixture(scope="module")
def few(splits):
    """256 public and 256 private examples: enough to check the mechanics quickly."""
    return dataclasses.replace(splits, public_x=splits.public_x[:256], public_y=splits.public_y[:256],
                               private_x=splits.private_x[:256], private_y=splits.private_y[:256])


def _rows(x):
    return Counter(tuple(r.tolist()) for r in x.flatten(1))


def test_splits_partition_the_training_set(splits):
    from chiplock_demo.data import load_digits8

    data = load_digits8(seed=0)
    assert len(splits.public_y) + len(splits.private_y) == len(data.y_train)
    assert abs(len(splits.public_y) - len(splits.private_y)) <= 1
    assert _rows(splits.public_x) + _rows(splits.private_x) == _rows(data.x_train)
    assert torch.equal(splits.test_x, data.x_test)
    again, other = load_splits("digits8", seed=0), load_splits("digits8", seed=1)
    assert torch.equal(again.public_x, splits.public_x) and torch.equal(again.private_y, splits.private_y)
    assert not torch.equal(other.public_y, splits.public_y)


def test_unknown_dataset():
    with pytest.raises(UnsupportedConfig, match="unknown data set 'cifar'"):
        load_splits("cifar")


def test_pretrain_public_uses_only_the_related_task(few, tiny):
    steps = []
    pretrain_public(tiny, few, classes=(0, 1), epochs=1, progress=lambda i, n: steps.append(n))
    n_sub = int(torch.isin(few.public_y, torch.tensor([0, 1])).sum())
    assert steps and steps[-1] == math.ceil(n_sub / 64) < math.ceil(len(few.public_y) / 64)
    with pytest.raises(ValueError, match="no public example"):
        pretrain_public(tiny, few, classes=(42,), epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        pretrain_public(tiny, few, epochs=-1)


def test_training_is_deterministic(few, tiny):
    a = pretrain_public(tiny, few, epochs=1, seed=3)
    b = pretrain_public(tiny, few, epochs=1, seed=3)
    c = pretrain_public(tiny, few, epochs=1, seed=4)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert not torch.equal(a.units[0].lin.weight, c.units[0].lin.weight)


def test_victim_and_teeslice_leave_the_public_model_alone(few, tiny):
    public = pretrain_public(tiny, few, epochs=1)
    before = {m: t.clone() for m, t in public.state_dict().items()}
    victim = finetune_victim(public, few, epochs=1)
    ts = train_teeslice(public, few, ratio=0.5, epochs=1, start=1)
    assert isinstance(ts, TeeSliceNet) and ts.ratio == 0.5 and ts.start == 1
    for m, t in public.state_dict().items():
        assert torch.equal(t, before[m]), m
        assert torch.equal(ts.backbone.state_dict()[m], t), m  # frozen backbone, BN statistics included
    assert not torch.equal(victim.units[0].lin.weight, public.units[0].lin.weight)


@pytest.mark.slow
def test_accuracy_thresholds_digits8(splits):
    """Default net and epochs on digits8: the public model (classes 0-4) is far from the task; the fine-tuned victim and
    the TEESlice model are accurate, and TEESlice stays close to the victim through the partition."""
    spec = net_spec_for(splits)
    public = pretrain_public(spec, splits)
    victim = finetune_victim(public, splits)
    ts = train_teeslice(public, splits)
    acc_pub, acc_victim, acc_ts = evaluate(public, splits), evaluate(victim, splits), evaluate(ts, splits)
    assert acc_pub < 0.6  # it never saw classes 5-9
    assert acc_victim > 0.93 and acc_ts > acc_victim - 0.04, (acc_victim, acc_ts)
    p = split(ts, "teeslice")
    host = HostModel(p.spec, p.public, LocalCall(build_secure(p.spec, p.secure)))
    assert evaluate(host, splits) == acc_ts
