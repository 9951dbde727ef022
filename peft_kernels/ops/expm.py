"""Batched matrix exponential with per-matrix squarings (and, for n < 128, a per-matrix Taylor
degree) and a fused Fréchet backward."""
from __future__ import annotations

import torch
from torch import Tensor

from peft_kernels._ext import C
from peft_kernels.ops._checks import check_fake_like
from peft_kernels.ops._dispatch import cpu_half_in_float32, custom_op


@custom_op("peft_kernels::expm_fwd")
def _expm_fwd(A: Tensor) -> Tensor:
    return cpu_half_in_float32(C().expm_fwd, A, floating=(0,))


@_expm_fwd.register_fake
def _(A):
    check_fake_like("expm", dict(A=A), "A")
    return torch.empty_like(A, memory_format=torch.contiguous_format)


@custom_op("peft_kernels::expm_bwd")
def _expm_bwd(A: Tensor, grad: Tensor) -> Tensor:
    return cpu_half_in_float32(C().expm_bwd, A, grad, floating=(0, 1))


@_expm_bwd.register_fake
def _(A, grad):
    if grad.device != A.device:
        raise ValueError(f"expm: grad is on {grad.device} but A is on {A.device}; "
                         "all tensors must be on one device")
    return torch.empty_like(A, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (A,) = inputs
    ctx.save_for_backward(A)


def _backward(ctx, grad):
    (A,) = ctx.saved_tensors
    return _expm_bwd(A, grad.to(A.dtype))


_expm_fwd.register_autograd(_backward, setup_context=_setup_context)


def expm(A: Tensor) -> Tensor:
    """``exp`` of every square matrix of ``A [..., n, n]``; a drop-in for ``torch.linalg.matrix_exp``.

    For n < 128 each matrix gets its own Taylor degree (1 … 18) and number of squarings from its
    own 1-norm, inside the kernel (no host synchronisation). From n = 128 on, the batch goes
    through batched GEMMs: its matrices share the degree (the highest one of them needs) and each
    keeps its own squarings (two small host synchronisations per call; on CUDA its float32
    products follow ``torch.backends.cuda.matmul.allow_tf32``, as torch.linalg.matrix_exp's
    do: with TF32 on, expect ~1e-3 relative error there). The gradient is the
    adjoint Fréchet derivative ``L(Aᵀ, G)``, evaluated along the same scheme at about 3× the
    forward's products.
    float32, float64, float16 and bfloat16 (computed in float32).
    A matrix with a NaN or Inf entry gives NaN for that matrix only.
    """
    if not isinstance(A, Tensor):
        raise TypeError(f"expm: A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"expm: A must be a batch of square matrices [..., n, n], got shape {tuple(A.shape)}")
    return _expm_fwd(A)
