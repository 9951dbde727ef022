"""LieRA (Si et al., 2025): Lie-group Hadamard adapters on a frozen nn.Linear or nn.Conv2d.

The weight is an element of the group of nonzero tensors under the Hadamard product:
``W_eff = W ⊙ exp(s·B A)`` reshaped to W's shape (``first_order=True``: ``W ⊙ (1 + s·B A)``, the
authors' code). Zeros of W stay zero; the exact form keeps every sign. The update is full rank
from r·(out + K) parameters, K = in (Linear) or in/groups·kh·kw (Conv2d).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peft_kernels.nn._base import in_base_dtype
from peft_kernels.ops.lie_weight import lie_conv2d, lie_linear


class _LieAdapter(nn.Module):
    """lora_A ``[r, K]``, lora_B ``[out, r]`` over the frozen ``self.base``; B starts at zero, so
    the layer equals its base at initialisation."""

    base: nn.Module
    _name = "LieAdapter"

    def _init_adapter(self, base: nn.Module, r: int, alpha: Optional[float],
                      first_order: bool) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{self._name}: r must be a positive int, got {r!r}")
        if alpha is not None and not math.isfinite(alpha):
            raise ValueError(f"{self._name}: alpha must be finite, got {alpha!r}")
        self.base = base
        base.requires_grad_(False)
        w = base.weight
        out, K = w.shape[0], w.shape[1:].numel()
        factory = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, K, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.first_order = bool(first_order)
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def _factor(self, compute: torch.dtype) -> Tensor:
        """exp(s·B A) (or 1 + s·B A) shaped like the weight, in `compute`."""
        delta = self.scaling * (self.lora_B.to(compute) @ self.lora_A.to(compute))
        delta = delta.view(self.base.weight.shape)
        return 1 + delta if self.first_order else torch.exp(delta)

    @torch.no_grad()
    def _merged_weight(self) -> Tensor:
        """W_eff in the weight's dtype; refused where unmerge() could not divide W back out."""
        w = self.base.weight
        compute = torch.promote_types(w.dtype, torch.float64)
        factor = self._factor(compute)
        merged = (w.to(compute) * factor).to(w.dtype)
        # A finite nonzero W whose W_eff overflows, or underflows to zero or into the subnormals
        # (where it was normal), is lost to unmerge (the first-order form's zero factor is
        # refused by unmerge itself).
        tiny = torch.finfo(w.dtype).tiny
        lost = (w.isfinite() & (w != 0)
                & ~(merged.isfinite() & (merged.abs() >= w.abs().clamp(max=tiny))))
        if self.first_order:
            lost &= factor != 0
        if bool(lost.any()):
            raise RuntimeError(
                f"{self._name}.merge: W ⊙ {'(1 + s·B A)' if self.first_order else 'exp(s·B A)'} "
                f"overflows or underflows {w.dtype} at {int(lost.sum())} entries, where unmerge() "
                "could not restore W; the layer still computes W_eff unmerged")
        return merged

    def _check_mergeable(self) -> None:
        self._merged_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Write W_eff into the base weight; forward then costs the plain layer. Refused when
        W_eff over- or underflows the weight's dtype where W is finite and nonzero."""
        if self.merged:
            raise RuntimeError(f"{self._name}.merge: already merged")
        self.base.weight.copy_(self._merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the factor out again: W up to the rounding of the weight's dtype. The
        first-order factor 1 + s·B A can be zero, and then W is lost: that is refused."""
        if not self.merged:
            raise RuntimeError(f"{self._name}.unmerge: not merged")
        w = self.base.weight
        compute = torch.promote_types(w.dtype, torch.float64)
        factor = self._factor(compute)
        if self.first_order and not bool((factor != 0).all()):
            raise RuntimeError(
                f"{self._name}.unmerge: the first-order factor 1 + s·B A is zero at "
                f"{int((factor == 0).sum())} entries, where the merged weight no longer holds W")
        w.copy_((w.to(compute) / factor).to(w.dtype))
        self.merged = False

    def get_extra_state(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "first_order": self.first_order,
                "merged": self.merged}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["r"] != self.r:
            raise ValueError(f"{self._name}: state has r={state['r']} but this layer has r={self.r}")
        self.alpha, self.first_order = float(state["alpha"]), bool(state["first_order"])
        self.merged = bool(state["merged"])

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, first_order={self.first_order}, "
                f"merged={self.merged}")


class LieLinear(_LieAdapter):
    """``y = x W_effᵀ + b`` with ``W_eff = W ⊙ exp(s·B A)`` over a frozen ``nn.Linear``
    (``s = alpha / r``). Build it with :meth:`from_linear`."""

    _name = "LieLinear"

    def __init__(self, in_features: int, out_features: int, r: int, *,
                 alpha: Optional[float] = None, first_order: bool = False, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter(base, r, alpha, first_order)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: Optional[float] = None,
                    first_order: bool = False) -> "LieLinear":
        """Wrap ``linear`` (its weight and bias are shared, not copied, and frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError("LieLinear.from_linear: linear must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_adapter(linear, r, alpha, first_order)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        w = self.base.weight
        return lie_linear(x, w, in_base_dtype(self.lora_A, w), in_base_dtype(self.lora_B, w),
                          bias=in_base_dtype(self.base.bias, w), scaling=self.scaling,
                          first_order=self.first_order)

    def extra_repr(self) -> str:
        return (f"in_features={self.base.in_features}, out_features={self.base.out_features}, "
                + super().extra_repr())


class LieConv2d(_LieAdapter):
    """The same update on a frozen ``nn.Conv2d``'s kernel ``[out, in/groups, kh, kw]`` (lora_A
    ``[r, in/groups·kh·kw]``), with any stride, padding (mode), dilation and groups of the base
    conv. Build it with :meth:`from_conv`."""

    _name = "LieConv2d"

    def __init__(self, conv: nn.Conv2d, r: int, *, alpha: Optional[float] = None,
                 first_order: bool = False):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"LieConv2d: conv must be an nn.Conv2d, got {type(conv).__name__}")
        self._init_adapter(conv, r, alpha, first_order)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, r: int, alpha: Optional[float] = None,
                  first_order: bool = False) -> "LieConv2d":
        """Wrap ``conv`` (its weight and bias are shared, not copied, and frozen)."""
        return cls(conv, r, alpha=alpha, first_order=first_order)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.base
        if self.merged:
            return conv(x)
        padding = conv.padding
        if conv.padding_mode != "zeros" or isinstance(padding, str):
            # As nn.Conv2d does for non-zero modes: pad explicitly, convolve unpadded ('same'
            # may need asymmetric padding, which the explicit pad also covers).
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        w = conv.weight
        return lie_conv2d(x, w, in_base_dtype(self.lora_A, w), in_base_dtype(self.lora_B, w),
                          bias=in_base_dtype(conv.bias, w),
                          stride=conv.stride, padding=padding, dilation=conv.dilation,
                          groups=conv.groups, scaling=self.scaling, first_order=self.first_order)

    def extra_repr(self) -> str:
        c = self.base
        return (f"{c.in_channels}, {c.out_channels}, kernel_size={c.kernel_size}, "
                + super().extra_repr())
