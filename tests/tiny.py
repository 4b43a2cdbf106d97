"""The tiny model, batches and eager train step the training-loop tests share."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def net(width: int = 16, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    """Linear(8, width) -> act -> Linear(width, 4), seeded: two calls give equal models."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), act(), nn.Linear(width, 4))


def batch(i: int = 0, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and class labels from their own generator (seed ``i``)."""
    g = torch.Generator().manual_seed(i)
    return torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows,), generator=g)


def train_step(model, optimizer, x, y):
    """Plain eager training step: zero_grad, cross-entropy, backward, step."""
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()
