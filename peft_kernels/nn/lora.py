"""LoRA and parallel bottleneck adapters on a frozen nn.Linear, through the fused kernels."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from peft_kernels.ops.lora_linear import ACTIVATIONS, lora_linear


class LoRALinear(nn.Module):
    """``y = base(x) + scaling · act(drop(x) Aᵀ) Bᵀ`` with ``base`` a frozen ``nn.Linear``.

    ``activation=None`` is LoRA (Hu et al. 2021); "relu", "gelu" or "silu" make it a parallel
    bottleneck adapter. ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    Build it with :meth:`from_linear`. The state dict holds the base weight and bias, lora_A,
    lora_B, and the configuration (r, alpha, dropout, activation, merged) as extra state.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        *,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        activation: Optional[str] = None,
        use_rslora: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear: r must be a positive int, got {r!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"LoRALinear: activation must be one of None, 'relu', 'gelu', 'silu', got {activation!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.dropout = float(dropout)
        self.activation = activation
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (as nn.Linear and HF PEFT), B zeros: the layer starts equal to base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        activation: Optional[str] = None,
        init: str = "kaiming",
        use_rslora: bool = False,
    ) -> "LoRALinear":
        """Wrap ``linear`` (its weight and bias are shared, not copied, and frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        if init != "kaiming":
            raise ValueError(f"LoRALinear.from_linear: init must be 'kaiming', got {init!r}")
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, r, alpha=alpha, dropout=dropout,
            activation=activation, use_rslora=use_rslora, bias=linear.bias is not None,
            device=w.device, dtype=w.dtype,
        )
        layer.base = linear
        linear.requires_grad_(False)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        return lora_linear(
            x, self.base.weight, self.lora_A, self.lora_B, scaling=self.scaling,
            bias=self.base.bias, dropout_p=self.dropout, activation=self.activation,
            training=self.training,
        )

    def delta_weight(self) -> Tensor:
        """``scaling · B A`` in float32 or wider (the update merge() adds to the base weight)."""
        compute = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; forward then costs one plain linear."""
        if self.activation is not None:
            raise RuntimeError(
                f"LoRALinear.merge: an adapter with activation={self.activation!r} is not linear in x "
                "and cannot be folded into the base weight"
            )
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to the rounding of the weight's dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: Tensor) -> None:
        w = self.base.weight
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
            "activation": self.activation, "use_rslora": self.use_rslora, "merged": self.merged,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["r"] != self.r:
            raise ValueError(f"LoRALinear: state has r={state['r']} but this layer has r={self.r}")
        self.alpha, self.dropout = float(state["alpha"]), float(state["dropout"])
        self.activation, self.use_rslora = state["activation"], bool(state["use_rslora"])
        self.merged = bool(state["merged"])

    def extra_repr(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, dropout={self.dropout:g}{act}, merged={self.merged}")
