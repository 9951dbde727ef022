"""Sparse fine-tuning of a frozen nn.Linear: ``W' = W + Δ`` with Δ nonzero at k chosen entries."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from peft_kernels.nn._base import WrappedLinear, in_base_dtype
from peft_kernels.ops.sparse_delta_linear import sparse_delta_linear


def _check_indices(indices: Tensor, out_features: int, in_features: int, where: str) -> Tensor:
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: indices must be an int64 or int32 tensor, got "
                        f"{type(indices).__name__ if not isinstance(indices, Tensor) else indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{where}: indices must be 1-D flat row-major positions, got shape "
                         f"{tuple(indices.shape)}")
    idx = torch.sort(indices.long()).values
    if idx.numel() > 0:
        if idx[0] < 0 or idx[-1] >= out_features * in_features:
            raise ValueError(f"{where}: indices must lie in [0, out_features * in_features) = "
                             f"[0, {out_features * in_features})")
        if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
            raise ValueError(f"{where}: indices must be unique")
    return idx


class SparseDeltaLinear(WrappedLinear):
    """``y = x (W + Δ)ᵀ + b`` with ``base`` a frozen ``nn.Linear`` and Δ nonzero only at the flat
    row-major positions ``indices`` (a buffer), where it holds the trainable ``values``.

    Only the k values train, so gradients and optimizer state are k numbers per layer; the
    backward computes them with the masked-gradient kernel (no dense ``out×in`` gradient). The
    values start at zero, so the layer equals its base at construction. Build it with
    :meth:`from_linear` or :meth:`from_mask`; the state dict holds the base weight and bias,
    ``indices``, ``values`` and whether the layer is merged. Loading a state dict with another k
    resizes ``indices`` and ``values`` to it (rebuild the optimizer afterwards).
    """

    def __init__(self, in_features: int, out_features: int, indices: Tensor, *, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.base.requires_grad_(False)
        idx = _check_indices(indices, out_features, in_features, "SparseDeltaLinear")
        self.register_buffer("indices", idx.to(device=self.base.weight.device))
        self.values = nn.Parameter(torch.zeros(idx.numel(), **factory))
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, indices: Tensor) -> "SparseDeltaLinear":
        """Wrap ``linear`` (shared, not copied, and frozen) with Δ at ``indices``: flat row-major
        positions in its weight, any order (they are sorted), unique, in range."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseDeltaLinear.from_linear: linear must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        w = linear.weight
        idx = _check_indices(indices, linear.out_features, linear.in_features,
                             "SparseDeltaLinear.from_linear")
        layer = cls(linear.in_features, linear.out_features, idx, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        layer.base = linear
        linear.requires_grad_(False)
        return layer

    @classmethod
    def from_mask(cls, linear: nn.Linear, mask: Tensor) -> "SparseDeltaLinear":
        """Wrap ``linear`` with Δ where the boolean ``mask`` (the weight's shape) is True."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseDeltaLinear.from_mask: linear must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("SparseDeltaLinear.from_mask: mask must be a bool tensor")
        if tuple(mask.shape) != tuple(linear.weight.shape):
            raise ValueError(f"SparseDeltaLinear.from_mask: mask must have the weight's shape "
                             f"{tuple(linear.weight.shape)}, got {tuple(mask.shape)}")
        return cls.from_linear(linear, mask.reshape(-1).nonzero().squeeze(1))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        w = self.base.weight
        return sparse_delta_linear(x, w, self.indices, in_base_dtype(self.values, w),
                                   bias=in_base_dtype(self.base.bias, w))

    def delta_weight(self) -> Tensor:
        """The dense Δ (``out×in``) in the values' dtype."""
        delta = torch.zeros(self.base.weight.numel(), dtype=self.values.dtype, device=self.values.device)
        delta[self.indices] = self.values.detach()
        return delta.view(self.base.weight.shape)

    def _merge_delta(self) -> Tensor:
        return self.values

    @torch.no_grad()
    def regrow(self, scores: Tensor, fraction: float = 0.1) -> Tensor:
        """SpIEL-style update of the entry set, k unchanged: drop the ``round(fraction · k)``
        entries of smallest ``|value|`` (the first in index order on ties) and grow as many new
        ones where ``scores`` (the weight's shape, e.g. accumulated ``|∇W|`` over some steps) is
        largest among the positions not kept. Kept entries keep their values; grown ones start at
        zero. ``values`` becomes a new Parameter: rebuild the optimizer (its state was per entry).
        Returns the positions (into the new ``indices``) of the grown entries."""
        if self.merged:
            raise RuntimeError("SparseDeltaLinear.regrow: the layer is merged; unmerge() it first")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"SparseDeltaLinear.regrow: fraction must be in [0, 1], got {fraction!r}")
        if not isinstance(scores, Tensor) or not scores.is_floating_point():
            raise TypeError("SparseDeltaLinear.regrow: scores must be a floating-point tensor")
        if tuple(scores.shape) != tuple(self.base.weight.shape):
            raise ValueError(f"SparseDeltaLinear.regrow: scores must have the weight's shape "
                             f"{tuple(self.base.weight.shape)}, got {tuple(scores.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("SparseDeltaLinear.regrow: scores must be finite")
        k = self.values.numel()
        n_swap = min(int(round(fraction * k)), self.in_features * self.out_features - k)
        # Stable sort on |value|: ties drop the entry with the smaller index first.
        order = torch.sort(self.values.detach().abs(), stable=True).indices
        keep = torch.sort(order[n_swap:]).values
        kept = self.indices[keep]
        candidates = scores.detach().reshape(-1).to(self.indices.device, torch.float64).clone()
        candidates[kept] = -float("inf")
        grown = torch.topk(candidates, n_swap).indices if n_swap else kept[:0]
        new_indices, perm = torch.sort(torch.cat([kept, grown]))
        new_values = torch.cat([self.values.detach()[keep], self.values.new_zeros(n_swap)])[perm]
        self.indices = new_indices
        self.values = nn.Parameter(new_values, requires_grad=self.values.requires_grad)
        return (perm >= k - n_swap).nonzero().squeeze(1)

    def _add_to_base(self, values: Tensor) -> None:
        flat = self.base.weight.view(-1)
        compute = torch.promote_types(flat.dtype, torch.float32)
        flat[self.indices] = (flat[self.indices].to(compute) + values.to(compute)).to(flat.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {"merged": self.merged}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.merged = bool(state["merged"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The checkpoint's indices are checked whatever their number; another number of entries
        # resizes this layer to it.
        idx = state_dict.get(prefix + "indices")
        if isinstance(idx, Tensor):
            checked = _check_indices(idx, self.out_features, self.in_features,
                                     "SparseDeltaLinear.load_state_dict")
            if not torch.equal(checked, idx.long()):
                raise ValueError("SparseDeltaLinear.load_state_dict: indices must be sorted")
            if idx.shape != self.indices.shape:
                self.indices = checked.to(self.indices.device)
                self.values = nn.Parameter(self.values.new_zeros(idx.numel()),
                                           requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k={self.values.numel()} ({100.0 * self.values.numel() / max(total, 1):.3g}%), "
                f"merged={self.merged}")
