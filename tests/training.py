"""Optimiser steps for the tests that check a swapped-in layer trains."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def fit(optimizer: torch.optim.Optimizer, loss_of: Callable[[object], torch.Tensor],
        batches: Iterable) -> list[float]:
    """One step of `optimizer` on `loss_of(batch)` per batch; returns the losses before each step."""
    losses = []
    for batch in batches:
        loss = loss_of(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
