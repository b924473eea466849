"""Plain training and evaluation loops shared by the demo, the attacks and soft locking."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(y), 1)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 5, lr: float = 2e-3,
                     batch_size: int = 64, seed: int = 0, progress=None) -> nn.Module:
    """Adam + cross-entropy, deterministic shuffling from ``seed``. ``progress(step, total)`` is optional."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = (len(y) + batch_size - 1) // batch_size
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            if progress is not None:
                progress(epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch)
    model.eval()
    return model
