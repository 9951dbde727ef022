"""Orthogonal (matrix Lie group) adapters: a frozen layer's input rotated by
R = blockdiag(exp(S_1), …, exp(S_k)), S_i = K_i − K_iᵀ, through the batched expm kernel.

exp maps the Lie algebra so(b) onto the rotations exactly; OFT (Qiu et al. 2023) uses the Cayley
map instead. Each block has b(b−1)/2 free parameters (the strict upper triangle of K_i), zero at
the start, so the adapted layer starts equal to the base layer.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from peft_kernels.nn._base import in_base_dtype
from peft_kernels.ops.block_rotate import block_rotate, rotated_linear
from peft_kernels.ops.expm import expm


def skew_from_params(params: Tensor, block_size: int) -> Tensor:
    """``[k, b(b−1)/2]`` strict-upper-triangle parameters → ``[k, b, b]`` skew-symmetric S."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    upper = params.new_zeros(params.shape[0], block_size, block_size)
    upper[:, rows, cols] = params
    return upper - upper.mT


def rotate_blocks(x: Tensor, rotations: Tensor, dim: int) -> Tensor:
    """Apply ``x_blk ↦ R_i x_blk`` to consecutive blocks of ``x`` along ``dim`` (``x Rᵀ`` for
    the last dimension) with the block_rotate kernel: no dense block-diagonal matrix."""
    return block_rotate(x, rotations, dim=dim)


class _OrthogonalBlocks(nn.Module):
    """The shared state of the orthogonal adapters: the generator parameters and the map to R."""

    def _init_blocks(self, features: int, block_size: int, device, dtype) -> None:
        if not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"{type(self).__name__}: block_size must be an int >= 2 (a 1 x 1 "
                             f"rotation has no parameter), got {block_size!r}")
        if features % block_size:
            raise ValueError(
                f"{type(self).__name__}: block_size={block_size} must divide the {features} input "
                "features/channels"
            )
        self.block_size = block_size
        num_blocks = features // block_size
        self.oft_params = nn.Parameter(
            torch.zeros(num_blocks, block_size * (block_size - 1) // 2, device=device, dtype=dtype)
        )
        self.merged = False

    def rotations(self) -> Tensor:
        """``[k, b, b]``: the orthogonal blocks exp(S_i)."""
        return expm(skew_from_params(self.oft_params, self.block_size))

    @torch.no_grad()
    def _fold(self, weight: Tensor, transpose: bool) -> None:
        # W' = W R (W Rᵀ undoes it), block by block over the input dimension (dim 1).
        compute = torch.promote_types(weight.dtype, torch.float32)
        R = self.rotations().to(compute)
        if transpose:
            R = R.mT
        folded = rotate_blocks(weight.to(compute), R.mT, dim=1)
        weight.copy_(folded.to(weight.dtype))

    def merge(self) -> None:
        """Fold R into the base weight (W ← W R); forward then costs the base layer alone."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge: already merged")
        self._fold(self.base.weight, transpose=False)
        self.merged = True

    def unmerge(self) -> None:
        """W ← W Rᵀ, exact up to rounding since R is orthogonal."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: not merged")
        self._fold(self.base.weight, transpose=True)
        self.merged = False

    def get_extra_state(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "merged": self.merged}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["block_size"] != self.block_size:
            raise ValueError(f"{type(self).__name__}: state has block_size={state['block_size']} "
                             f"but this layer has block_size={self.block_size}")
        self.merged = bool(state["merged"])


class OrthogonalLinear(_OrthogonalBlocks):
    """``y = base(x Rᵀ)`` with ``base`` a frozen ``nn.Linear`` and R block-diagonal orthogonal.

    Equivalent to the base layer with weight ``W R``. The rotation is folded into the weight block
    by block every call (out·in·b flops: no in×in matrix, no rotated copy of the activations), and
    the backward costs the base layer's dx GEMM plus one pass over dx and x
    (:func:`~peft_kernels.ops.rotated_linear`), with no out×in weight gradient.
    Build it with :meth:`from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, block_size: int = 8, *, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.base.requires_grad_(False)
        self._init_blocks(in_features, block_size, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 8) -> "OrthogonalLinear":
        """Wrap ``linear`` (its weight and bias are shared, not copied, and frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"OrthogonalLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, block_size, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        layer.base = linear
        linear.requires_grad_(False)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        w = self.base.weight
        return rotated_linear(x, w, in_base_dtype(self.rotations(), w),
                              in_base_dtype(self.base.bias, w))

    def extra_repr(self) -> str:
        return (f"in_features={self.base.in_features}, out_features={self.base.out_features}, "
                f"block_size={self.block_size}, merged={self.merged}")


class OrthogonalConv2d(_OrthogonalBlocks):
    """``y = base(R x)`` over input channels with ``base`` a frozen ``nn.Conv2d`` (groups=1).

    Equivalent to the base convolution with ``W'[o, :, h, w] = W[o, :, h, w] R``: every spatial
    kernel keeps its structure. Build it with :meth:`from_conv`.
    """

    def __init__(self, conv: nn.Conv2d, block_size: int = 8):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"OrthogonalConv2d: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"OrthogonalConv2d: only groups=1 convolutions, got groups={conv.groups}")
        self.base = conv
        conv.requires_grad_(False)
        self._init_blocks(conv.in_channels, block_size, conv.weight.device, conv.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, block_size: int = 8) -> "OrthogonalConv2d":
        """Wrap ``conv`` (its weight and bias are shared, not copied, and frozen)."""
        return cls(conv, block_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        rotations = in_base_dtype(self.rotations(), self.base.weight)
        return self.base(rotate_blocks(x, rotations, dim=-3))

    def extra_repr(self) -> str:
        return (f"in_channels={self.base.in_channels}, out_channels={self.base.out_channels}, "
                f"block_size={self.block_size}, merged={self.merged}")


def _is_orthogonal(Q: Tensor, eps: float) -> bool:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    return bool(torch.allclose(Q.mT @ Q, eye, atol=eps))


class _MatrixExpOrthogonal(nn.Module):
    """``Q = B · exp(A)[:, :k]`` with A skew-symmetric from the strictly lower triangle of the
    free parameter X [n, k] (n ≥ k; a wide weight is handled transposed) and B an orthogonal
    n×n buffer: torch.nn.utils.parametrizations.orthogonal's "matrix_exp" trivialization,
    with the batched kernel as the map."""

    def __init__(self, shape: torch.Size, device, dtype):
        super().__init__()
        self.shape = shape
        n, k = shape[-2:]
        self.transposed = n < k
        n, k = max(n, k), min(n, k)
        self.n, self.k = n, k
        self.register_buffer("base", torch.eye(n, device=device, dtype=dtype).expand(*shape[:-2], n, n).clone())

    def _skew(self, X: Tensor) -> Tensor:
        if self.transposed:
            X = X.mT
        A = X.tril(-1)
        if self.n != self.k:
            A = torch.cat([A, A.new_zeros(*A.shape[:-1], self.n - self.k)], dim=-1)
        return A - A.mT

    def forward(self, X: Tensor) -> Tensor:
        Q = (self.base @ expm(self._skew(X)))[..., : self.k]
        return Q.mT if self.transposed else Q

    @torch.no_grad()
    def right_inverse(self, Q: Tensor) -> Tensor:
        if Q.shape != self.shape:
            raise ValueError(f"matrix_exp_orthogonal: expected a tensor of shape {tuple(self.shape)}, "
                             f"got {tuple(Q.shape)}")
        if self.transposed:
            Q = Q.mT
        eps = 1e-5 if Q.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
        if not _is_orthogonal(Q, eps):
            # The nearest matrix with orthonormal columns of the same orientation (QR with R's
            # diagonal made positive), as torch's orthogonal() does.
            Qr, R = torch.linalg.qr(Q)
            Q = Qr * torch.sgn(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
        if self.n != self.k:  # complete the columns to an orthonormal basis, keeping Q's
            filler = torch.randn(*Q.shape[:-1], self.n - self.k, dtype=Q.dtype, device=Q.device)
            full, R = torch.linalg.qr(torch.cat([Q, filler], dim=-1))
            full = full * torch.sgn(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
            self.base.copy_(full)
        else:
            self.base.copy_(Q)
        zeros = torch.zeros(self.shape, dtype=Q.dtype, device=Q.device)
        return zeros


def matrix_exp_orthogonal(module: nn.Module, name: str = "weight") -> nn.Module:
    """Constrain ``module.<name>`` ([..., n, k] floating) to orthonormal columns (rows if n < k)
    with :func:`torch.nn.utils.parametrize`, the map being the batched :func:`~peft_kernels.ops.expm`.

    A drop-in for ``torch.nn.utils.parametrizations.orthogonal(module, name,
    orthogonal_map="matrix_exp")``: the weight starts at the orthogonal matrix nearest to its
    current value (exactly it, if already orthogonal); assigning an orthogonal matrix to
    ``module.<name>`` sets it. Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"matrix_exp_orthogonal: module has no tensor {name!r}")
    if weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(f"matrix_exp_orthogonal: {name} must be a floating tensor with >= 2 dims, "
                         f"got shape {tuple(weight.shape)} and dtype {weight.dtype}")
    parametrize.register_parametrization(
        module, name, _MatrixExpOrthogonal(weight.shape, weight.device, weight.dtype)
    )
    return module
