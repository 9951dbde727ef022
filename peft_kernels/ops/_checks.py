"""Argument checks the Python side of every op shares (the C++ side checks the rest)."""
from __future__ import annotations

from typing import Optional

import torch
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
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: weight must be frozen (requires_grad=False); it receives no "
                         "gradient. Call weight.requires_grad_(False) or pass weight.detach().")


def check_tensors(op: str, required: dict, optional: Optional[dict] = None) -> None:
    """Each of ``required`` a tensor, each of ``optional`` a tensor or None: a TypeError naming
    the argument, before anything reads a tensor attribute of it."""
    for name, t in required.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (optional or {}).items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")


_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_fake_like(op: str, named: dict, ref: str) -> None:
    """For the fake kernels (meta tensors, torch.compile's tracing), which never reach the C++
    checks: the tensors of ``named`` (None allowed) on one device and in ``named[ref]``'s dtype,
    a floating one."""
    check_one_device(op, named, ref)
    dtype = named[ref].dtype
    if dtype not in _FLOATING:
        raise TypeError(f"{op}: {ref} must be float32, float64, float16 or bfloat16, got {dtype}")
    for name, t in named.items():
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref} has {dtype}")


def check_fake_shape(op: str, name: str, t: Tensor, expected: tuple, text: str) -> None:
    """``t``'s shape against ``expected`` (None: any size there), for the fake kernels."""
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        raise ValueError(f"{op}: {name} must have shape {text}, got {tuple(t.shape)}")
