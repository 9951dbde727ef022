"""LoRA and parallel bottleneck adapters on a frozen nn.Linear, through the fused kernels."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from peft_kernels.nn._base import WrappedLinear, in_base_dtype
from peft_kernels.ops.lora_linear import ACTIVATIONS, lora_linear


class LoRALinear(WrappedLinear):
    """``y = base(x) + scaling · act(drop(x) Aᵀ) Bᵀ`` with ``base`` a frozen ``nn.Linear``.

    ``activation=None`` is LoRA (Hu et al. 2021); "relu", "gelu" or "silu" make it a parallel
    bottleneck adapter. ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    Build it with :meth:`from_linear`. The state dict holds the base weight and bias, lora_A,
    lora_B, and the configuration (r, alpha, dropout, activation, merged) as extra state.
    PiSSA (``init="pissa"``, or :func:`pissa_init` over a whole model) changes only the values of
    lora_A, lora_B and the base weight, so a PiSSA layer saves and loads like any other.
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
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
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
        """Wrap ``linear`` (its weight and bias are shared, not copied, and frozen).

        ``init="kaiming"``: A Kaiming-uniform, B zeros. ``init="pissa"`` (LoRA only, needs
        ``r <= min(out, in)`` and a positive scaling): A and B from the top-r singular triplets
        of W and the residual ``W - s·B A`` written into ``linear.weight`` in place, so the layer
        still computes ``linear``'s original output; see :func:`pissa_init`.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        if init not in ("kaiming", "pissa"):
            raise ValueError(f"LoRALinear.from_linear: init must be 'kaiming' or 'pissa', got {init!r}")
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, r, alpha=alpha, dropout=dropout,
            activation=activation, use_rslora=use_rslora, bias=linear.bias is not None,
            device=w.device, dtype=w.dtype,
        )
        if init == "pissa":
            # Checked before linear is attached, so a refusal leaves the caller's linear untouched.
            _check_pissa_layer(layer, "LoRALinear.from_linear")
        layer.base = linear
        linear.requires_grad_(False)
        if init == "pissa":
            full = _full_weight(layer)
            U, S, Vh = _top_singular_triplets(full.unsqueeze(0), r, {})
            _write_pissa(layer, full, U[0], S[0], Vh[0])
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        w = self.base.weight
        return lora_linear(
            x, w, in_base_dtype(self.lora_A, w), in_base_dtype(self.lora_B, w),
            scaling=self.scaling, bias=in_base_dtype(self.base.bias, w), dropout_p=self.dropout,
            activation=self.activation, training=self.training,
        )

    def delta_weight(self) -> Tensor:
        """``scaling · B A`` in float32 or wider (the update merge() adds to the base weight)."""
        compute = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling

    def _merge_delta(self) -> Tensor:
        return self.delta_weight()

    def _check_mergeable(self) -> None:
        if self.activation is not None:
            raise RuntimeError(
                f"LoRALinear.merge: an adapter with activation={self.activation!r} is not linear in x "
                "and cannot be folded into the base weight"
            )

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


# ---------------------------------------------------------------------------------------------
# PiSSA (Meng et al. 2024): the adapter starts on the principal singular subspace of W.

def _check_pissa_layer(layer: LoRALinear, where: str) -> None:
    """Refuse a layer PiSSA cannot initialise, before anything is written."""
    if layer.activation is not None:
        raise ValueError(
            f"{where}: PiSSA initialises LoRA only; a layer with activation={layer.activation!r} "
            "is not linear in x, so its adapter cannot carry part of W")
    if layer.merged:
        raise ValueError(f"{where}: the layer is merged (its base weight holds the update); "
                         "unmerge() it before PiSSA initialisation")
    limit = min(layer.in_features, layer.out_features)
    if layer.r > limit:
        raise ValueError(f"{where}: PiSSA needs r <= min(out_features, in_features) = {limit}, "
                         f"got r={layer.r}")
    if not (math.isfinite(layer.scaling) and layer.scaling > 0):
        # A = sqrt(S) Vh / sqrt(s) needs s > 0.
        raise ValueError(f"{where}: PiSSA needs a positive, finite scaling alpha / r, got "
                         f"alpha={layer.alpha:g} (scaling {layer.scaling:g})")


def _top_singular_triplets(weights: Tensor, k: int, svd_options: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of every matrix of ``weights`` [G, out, in], in float32 or float64 (W's
    dtype if float64): half-precision singular vectors would cost the residual most of its bits."""
    from peft_kernels.ops import truncated_svd  # at call time: the op lives in its own module

    compute = torch.promote_types(weights.dtype, torch.float32)
    with torch.no_grad():
        return truncated_svd(weights.detach().to(compute), k, **svd_options)


@torch.no_grad()
def _full_weight(layer: LoRALinear) -> Tensor:
    """The weight the layer computes with, ``W + s·B A``, in float32 or wider: what PiSSA
    decomposes. B is zero for a fresh adapter; a trained one's update is kept in the total."""
    w = layer.base.weight.detach()
    full = w.to(torch.promote_types(w.dtype, torch.float32))
    if bool(layer.lora_B.detach().ne(0).any()):
        full = full + layer.delta_weight().to(full.dtype)
    return full


@torch.no_grad()
def _write_pissa(layer: LoRALinear, full: Tensor, U: Tensor, S: Tensor, Vh: Tensor) -> None:
    """A = sqrt(S_r) Vh_r / sqrt(s), B = U_r sqrt(S_r) / sqrt(s), base ← W_full − s·B A with
    ``full`` = W_full = W + s·B A of the adapter as it was (:func:`_full_weight`), the matrix
    U, S, Vh decompose.

    U [out, >= r], S [>= r], Vh [>= r, in] in the compute dtype; the first r triplets are used.
    The residual subtracts the product of the A and B as stored (rounded to the layer's dtype),
    so base + s·B A reproduces W_full up to one rounding of the residual.
    """
    r, s = layer.r, layer.scaling
    root = S[:r].clamp_min(0).sqrt() / math.sqrt(s)
    layer.lora_A.copy_(root[:, None] * Vh[:r])
    layer.lora_B.copy_(U[:, :r] * root[None, :])
    w = layer.base.weight
    delta = layer.delta_weight().to(full.dtype)
    w.copy_((full - delta).to(w.dtype))


# Bytes of same-shaped base weights that pissa_init stacks into one truncated_svd call.
PISSA_SLICE_BYTES = 1 << 30


def pissa_init(
    model_or_layers: Union[nn.Module, Iterable[LoRALinear]],
    *,
    niter: Optional[int] = None,
    oversample: Optional[int] = None,
    method: Optional[str] = None,
) -> dict[str, LoRALinear]:
    """PiSSA-initialise every LoRALinear of a model (or the given LoRALinear layers) in place.

    Each layer keeps its own r and scaling s: ``A = sqrt(S_r) Vh_r / sqrt(s)``,
    ``B = U_r sqrt(S_r) / sqrt(s)`` from the top-r SVD of the weight it computes with,
    ``W_full = W + s·B A`` (W alone while B is zero, as after ``init="kaiming"``; a trained or
    PiSSA-initialised adapter's update stays in it), and the base weight becomes
    ``W_full - s·B A`` for the new A and B, so the model's outputs are unchanged. Layers whose weights share shape,
    dtype and device are stacked and decomposed by batched ``pk.ops.truncated_svd`` calls of
    up to ``PISSA_SLICE_BYTES`` (1 GiB) of weights each (k = the largest r of the group; each
    layer takes its first r triplets). ``niter``, ``oversample`` and ``method`` are passed to
    that op when given. Parameters are written in place, so an optimizer built before keeps
    working.

    Every layer must be a LoRA layer (activation=None), unmerged, with r <= min(out, in) and
    alpha / r > 0; all are checked before any is written. Returns the initialised layers by
    name (``model.named_modules()`` names, or "0", "1", ... for an iterable).
    """
    where = "pissa_init"
    if isinstance(model_or_layers, LoRALinear):
        named = [("", model_or_layers)]
    elif isinstance(model_or_layers, nn.Module):
        named = [(n, m) for n, m in model_or_layers.named_modules() if isinstance(m, LoRALinear)]
        if not named:
            raise ValueError(f"{where}: model_or_layers has no LoRALinear layers; convert its "
                             "linears first (LoRALinear.from_linear)")
    elif isinstance(model_or_layers, Iterable) and not isinstance(model_or_layers, (str, Tensor)):
        named = [(str(i), m) for i, m in enumerate(model_or_layers)]
        for name, m in named:
            if not isinstance(m, LoRALinear):
                raise TypeError(f"{where}: model_or_layers[{name}] must be a LoRALinear, got "
                                f"{type(m).__name__}")
        if not named:
            raise ValueError(f"{where}: model_or_layers is empty")
    else:
        raise TypeError(f"{where}: model_or_layers must be an nn.Module or an iterable of "
                        f"LoRALinear, got {type(model_or_layers).__name__}")

    seen: dict[int, str] = {}
    for name, layer in named:
        label = f"{where}: layer {name!r}"
        _check_pissa_layer(layer, label)
        # A weight decomposed twice would lose the first adapter's share of W.
        first = seen.setdefault(id(layer.base.weight), name)
        if first != name:
            raise ValueError(f"{label} shares its base weight with layer {first!r}; "
                             "each weight can be PiSSA-initialised once")

    groups: dict[tuple, list[LoRALinear]] = {}
    for _, layer in named:
        w = layer.base.weight
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(layer)
    svd_options = {key: value for key, value in
                   (("niter", niter), ("oversample", oversample), ("method", method))
                   if value is not None}
    for layers in groups.values():
        w = layers[0].base.weight
        k = max(layer.r for layer in layers)
        # Slices of at most PISSA_SLICE_BYTES of stacked weights: a whole 7B model's MLP group
        # would be an 8.7 GB bfloat16 stack and a 17 GB float32 copy next to the model.
        per_slice = max(1, PISSA_SLICE_BYTES // (w.numel() * w.element_size()))
        for start in range(0, len(layers), per_slice):
            part = layers[start:start + per_slice]
            stacked = w.new_empty((len(part), *w.shape),
                                  dtype=torch.promote_types(w.dtype, torch.float32))
            for i, layer in enumerate(part):
                stacked[i] = _full_weight(layer)
            U, S, Vh = _top_singular_triplets(stacked, k, svd_options)
            for i, layer in enumerate(part):
                _write_pissa(layer, stacked[i], U[i], S[i], Vh[i])
    return dict(named)
