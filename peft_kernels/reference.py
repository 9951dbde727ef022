"""Pure-PyTorch (and numpy) implementations of every op: the test oracle and benchmark baseline.

Nothing here calls the compiled extension. Run them in float64 for an oracle.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Philox4x32-10 and the dropout mask convention of csrc/kernels/common.h, transcribed independently.
_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on counters ``[..., 4]`` (uint32) with key (k0, k1); returns ``[..., 4]`` uint32."""
    c = [counter[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for _ in range(10):
        p0 = _PHILOX_M0 * c[0]
        p1 = _PHILOX_M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
        k0, k1 = (k0 + _PHILOX_W0) & 0xFFFFFFFF, (k1 + _PHILOX_W1) & 0xFFFFFFFF
    return np.stack(c, axis=-1).astype(np.uint32)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float) -> Tensor:
    """Boolean keep-mask ``[rows, cols]`` that lora_linear's kernels use for seed and p: element
    (row, col) is kept iff 16-bit field ``col % 8`` (low half of word 0 first) of Philox at
    counter (col // 8, row) is at least round(p · 2^16), that threshold being at least 1 for p > 0."""
    threshold = max(int(p * 65536.0 + 0.5), 1) if p > 0 else 0
    n_groups = (cols + 7) // 8
    row = np.arange(rows, dtype=np.uint64)[:, None].repeat(n_groups, 1)
    grp = np.arange(n_groups, dtype=np.uint64)[None, :].repeat(rows, 0)
    counter = np.stack(
        [grp & _MASK32, row & _MASK32, row >> np.uint64(32), np.zeros_like(row)], axis=-1
    ).astype(np.uint32)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    words = philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32)).reshape(rows, n_groups * 4)
    fields = np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(rows, n_groups * 8)
    keep = fields[:, :cols] >= threshold
    return torch.from_numpy(np.ascontiguousarray(keep))


# ---------------------------------------------------------------------------------------------
_ACT = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


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
    keep_mask: Optional[Tensor] = None,
) -> Tensor:
    """HF-PEFT-style LoRA / parallel adapter: ``F.linear(x, W, b) + act(A(drop(x))) Bᵀ · s``.

    With ``keep_mask`` (bool, x's shape) dropout uses that mask (scaled by 1/(1-p)); without it,
    ``F.dropout`` draws one, as the pure-PyTorch layers people use today do.
    """
    base = F.linear(x, weight, bias)
    if training and dropout_p > 0:
        if keep_mask is None:
            x = F.dropout(x, dropout_p, training=True)
        else:
            x = x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    return base + F.linear(_ACT[activation](F.linear(x, lora_A)), lora_B) * scaling


# ---------------------------------------------------------------------------------------------
def oft_rotation(params: Tensor, block_size: int, rotation_map: str = "expm") -> Tensor:
    """OFT-style dense rotation ``blockdiag(R_1, …, R_k)`` [in, in] from the per-block strict
    upper triangles ``params [k, b(b−1)/2]`` (row-major order), with S_i = K_i − K_iᵀ and
    ``R_i = matrix_exp(S_i)`` or the Cayley map ``(I − S_i)⁻¹ (I + S_i)``."""
    k, b = params.shape[0], block_size
    blocks = []
    for i in range(k):
        K = params.new_zeros(b, b)
        pos = 0
        for r in range(b):
            for c in range(r + 1, b):
                K = K.index_put((torch.tensor(r), torch.tensor(c)), params[i, pos])
                pos += 1
        S = K - K.T
        if rotation_map == "expm":
            blocks.append(torch.linalg.matrix_exp(S))
        elif rotation_map == "cayley":
            eye = torch.eye(b, dtype=S.dtype, device=S.device)
            blocks.append(torch.linalg.solve(eye - S, eye + S))
        else:
            raise ValueError(f"rotation_map must be 'expm' or 'cayley', got {rotation_map!r}")
    return torch.block_diag(*blocks)


def oft_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], params: Tensor, block_size: int,
               rotation_map: str = "expm") -> Tensor:
    """OFT-style layer as pure-PyTorch implementations write it: the dense rotation folded into
    the weight every call, ``F.linear(x, W R, b)``."""
    R = oft_rotation(params, block_size, rotation_map)
    return F.linear(x, weight @ R, bias)


def sparse_delta_dense(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """The dense Δ (``out×in``) with ``Δ.view(-1)[indices] = values``, differentiable in values."""
    return torch.zeros(weight.numel(), dtype=values.dtype, device=values.device).index_put(
        (indices.long(),), values).view(weight.shape)


def sparse_delta_linear(x: Tensor, weight: Tensor, indices: Tensor, values: Tensor,
                        bias: Optional[Tensor] = None) -> Tensor:
    """Sparse fine-tuning as SIFT / SpIEL-style pure PyTorch computes it: the dense ``W + Δ`` and
    ``F.linear``; autograd forms the dense ``out×in`` gradient of Δ and keeps its k entries."""
    return F.linear(x, weight + sparse_delta_dense(weight, indices, values), bias)


def lie_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
               first_order: bool = False) -> Tensor:
    """LieRA's weight: ``W ⊙ exp(s·(B A).view_as(W))``, or ``W ⊙ (1 + s·B A)`` to first order."""
    delta = scaling * (lora_B @ lora_A).view_as(weight)
    return weight * (1 + delta) if first_order else weight * torch.exp(delta)


def lie_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
               scaling: float, first_order: bool = False) -> Tensor:
    return F.linear(x, lie_weight(weight, lora_A, lora_B, scaling, first_order), bias)


def lie_conv2d(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
               scaling: float, first_order: bool = False, **conv) -> Tensor:
    return F.conv2d(x, lie_weight(weight, lora_A, lora_B, scaling, first_order), bias, **conv)


def truncated_svd(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k SVD of every matrix of A through numpy's LAPACK in float64, with the package's sign
    convention (the largest-magnitude entry of each column of U, the first on ties, positive)."""
    a = A.detach().double().cpu().numpy()
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    u, s, vh = u[..., :, :k], s[..., :k], vh[..., :k, :]
    pivot = np.abs(u).argmax(axis=-2)[..., None, :]
    sign = np.where(np.take_along_axis(u, pivot, axis=-2) < 0, -1.0, 1.0)
    return torch.from_numpy(u * sign), torch.from_numpy(s.copy()), torch.from_numpy(vh * sign.swapaxes(-1, -2))
