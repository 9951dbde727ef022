"""Argument checks the Python side of every op shares (the C++ side checks the rest)."""
from __future__ import annotations

from torch import Tensor


def check_one_device(op: str, named: dict, ref: str) -> None:
    """All tensors of `named` (None allowed) on `named[ref]`'s device. The dispatcher picks one
    backend for mixed-device inputs (a meta tensor sends the call to the fake kernel), so the
    fake kernels refuse like the C++ checks do instead of answering on one device."""
    device = named[ref].device
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref} is on {device}; "
                             "all tensors must be on one device")


def check_frozen(op: str, weight: Tensor) -> None:
    """The frozen base weight receives no gradient: refuse one that asks for it."""
    import torch

    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: weight must be frozen (requires_grad=False); it receives no "
                         "gradient. Call weight.requires_grad_(False) or pass weight.detach().")
