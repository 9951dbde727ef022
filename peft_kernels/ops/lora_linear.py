"""Fused low-rank adapter matmul: y = x Wᵀ + bias + scaling · act(drop(x) Aᵀ) Bᵀ."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_kernels._ext import C
from peft_kernels.ops._checks import (check_fake_like, check_fake_shape, check_frozen,
                                      check_one_device, check_tensors)
from peft_kernels.ops._dispatch import cpu_half_in_float32, custom_op

ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "silu": 3}


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@custom_op("peft_kernels::lora_linear_fwd", cast_under_autocast=True)
def _lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Optional[Tensor],
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    activation: int,
) -> tuple[Tensor, Tensor]:
    return cpu_half_in_float32(C().lora_linear_fwd, x, weight, lora_A, lora_B, bias, seed, scaling,
                               dropout_p, activation, floating=(0, 1, 2, 3, 4),
                               float32_outputs=(1,))


@_lora_linear_fwd.register_fake
def _(x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p, activation):
    op = "lora_linear"
    check_fake_like(op, dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias), "x")
    check_one_device(op, dict(x=x, seed=seed), "x")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., in_features], got a 0-D tensor")
    check_fake_shape(op, "weight", weight, (None, x.shape[-1]), "[out_features, in_features]")
    check_fake_shape(op, "lora_A", lora_A, (None, x.shape[-1]), "[r, in_features]")
    check_fake_shape(op, "lora_B", lora_B, (weight.shape[0], lora_A.shape[0]), "[out_features, r]")
    if bias is not None:
        check_fake_shape(op, "bias", bias, (weight.shape[0],), "[out_features]")
    lead = x.shape[:-1]
    y = x.new_empty((*lead, weight.shape[0]))
    pre = x.new_empty((*lead, lora_A.shape[0]), dtype=_accumulation_dtype(x.dtype))
    return y, pre


@custom_op("peft_kernels::lora_linear_bwd")
def _lora_linear_bwd(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    pre: Tensor,
    seed: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    activation: int,
    need_x: bool,
    need_A: bool,
    need_B: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return cpu_half_in_float32(
        C().lora_linear_bwd, grad_out, x, weight, lora_A, lora_B, pre, seed, scaling, dropout_p,
        activation, need_x, need_A, need_B, need_bias, floating=(0, 1, 2, 3, 4),
    )


@_lora_linear_bwd.register_fake
def _(grad_out, x, weight, lora_A, lora_B, pre, seed, scaling, dropout_p, activation,
      need_x, need_A, need_B, need_bias):
    def maybe(flag, like):
        return like.new_empty(like.shape) if flag else x.new_empty((0,))

    return maybe(need_x, x), maybe(need_A, lora_A), maybe(need_B, lora_B), x.new_empty(
        (weight.shape[0],) if need_bias else (0,)
    )


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p, activation = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(x, weight, lora_A, lora_B, pre, seed)
    ctx.scaling, ctx.dropout_p, ctx.activation = scaling, dropout_p, activation
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_pre):
    x, weight, lora_A, lora_B, pre, seed = ctx.saved_tensors
    need_x, _, need_A, need_B, need_bias = ctx.needs_input_grad[:5]
    need_bias = bool(need_bias and ctx.has_bias)
    if not (need_x or need_A or need_B or need_bias):
        return None, None, None, None, None, None, None, None, None
    dx, dA, dB, dbias = _lora_linear_bwd(
        grad_y, x, weight, lora_A, lora_B, pre, seed, ctx.scaling, ctx.dropout_p, ctx.activation,
        need_x, need_A, need_B, need_bias,
    )
    return (
        dx if need_x else None, None, dA if need_A else None, dB if need_B else None,
        dbias if need_bias else None, None, None, None, None,
    )


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def draw_dropout_seed(device: torch.device | str) -> Tensor:
    """The dropout seed lora_linear draws: one int64 from the default generator of `device`.

    It stays on `device`, so CUDA kernels read it without a host sync. Seeding torch
    (torch.manual_seed) and calling this again reproduces a call's mask.
    """
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scaling: float = 1.0,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    activation: Optional[str] = None,
    training: bool = True,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """``x Wᵀ + bias + scaling · act(drop(x) Aᵀ) Bᵀ`` with fused adapter kernels.

    x ``[..., in]``, weight ``[out, in]`` (frozen: it receives no gradient), lora_A ``[r, in]``,
    lora_B ``[out, r]``, bias ``[out]`` or None. ``activation=None`` is LoRA; "relu", "gelu"
    (erf form) or "silu" make it a parallel bottleneck adapter. Dropout (inverted, as
    ``torch.nn.Dropout``) acts on the adapter branch only and only when ``training``; its mask is a
    function of ``seed`` (default: :func:`draw_dropout_seed`), regenerated in backward, never stored.
    The mask compares a 16-bit Philox field per element with a threshold, so the drop
    probability is ``dropout_p`` to within 2⁻¹⁷, and at least 2⁻¹⁶ for any ``dropout_p > 0``.

    Gradients flow to x, lora_A, lora_B and bias. float32, float64, float16, bfloat16 (float32
    accumulation; the CPU converts half inputs to float32).
    """
    check_tensors("lora_linear", dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B),
                  dict(bias=bias, seed=seed))
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"lora_linear: activation must be one of None, 'relu', 'gelu', 'silu', got {activation!r}"
        )
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    check_frozen("lora_linear", weight)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_dropout_seed(x.device)
    elif p == 0.0:
        seed = None
    y, _ = _lora_linear_fwd(
        x, weight, lora_A, lora_B, bias, seed, float(scaling), p, ACTIVATIONS[activation]
    )
    return y
