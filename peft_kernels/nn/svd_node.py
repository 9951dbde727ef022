"""SVD-node adapters (Zheng & Cao, arXiv:2412.08592): W = W_res + A B over a truncated SVD.

Each rank-1 component (column i of A with row i of B) is a node, and so is a trainable bias.
The selection (GGM/BCD in pk.select) decides which nodes keep training; :meth:`freeze_nodes` folds
the others into the frozen residual.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

from peft_kernels.nn._base import WrappedLinear, in_base_dtype
from peft_kernels.ops.lora_linear import lora_linear


def _check_rank(r: Any, out_features: int, in_features: int, where: str) -> int:
    limit = min(out_features, in_features)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= limit:
        raise ValueError(f"{where}: r must be an int in [1, min(out_features, in_features)] = "
                         f"[1, {limit}], got {r!r}")
    return r


class SVDNodeLinear(WrappedLinear):
    """``y = x W_resᵀ + (x Bᵀ) Aᵀ + b`` with ``A = U_r`` ``[out, r]`` and ``B = Σ_r V_rᵀ``
    ``[r, in]`` from the top-r SVD of the wrapped linear's weight W, ``W_res = W − A B``.

    ``W_res`` is the frozen ``base.weight`` (as in LoRALinear, the wrapped ``nn.Linear`` is kept
    and its weight overwritten in place); A and B train. The base bias trains too by default
    (``train_bias=True``): METHODS §4 makes each trainable bias a node, scored and kept or frozen
    like the components. Nodes are numbered 0..rank−1 for the components (the
    columns of A / rows of B, in their current order) and ``rank`` for the bias when it trains.

    The forward is the fused low-rank op (``lora_linear`` with lora_A = B, lora_B = A, scaling 1).
    The state dict holds ``base.weight`` (W_res), ``base.bias``, A, B and (rank, train_bias,
    merged) as extra state; loading a checkpoint with another rank resizes A and B to it
    (rebuild the optimizer afterwards, as after :meth:`freeze_nodes`).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 10, *, bias: bool = True,
                 train_bias: bool = True, device=None, dtype=None):
        super().__init__()
        _check_rank(r, out_features, in_features, "SVDNodeLinear")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_nodes(base, r, train_bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 10, *, train_bias: bool = True) -> "SVDNodeLinear":
        """Split ``linear`` into W_res + A B with r nodes (positional: ``from_linear(linear, 10)``).

        ``linear`` is shared, not copied: its weight becomes W_res in place and is frozen; its
        bias trains when ``train_bias`` (and is frozen otherwise).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SVDNodeLinear.from_linear: linear must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        _check_rank(r, linear.out_features, linear.in_features, "SVDNodeLinear.from_linear")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_nodes(linear, r, train_bias)
        return layer

    @torch.no_grad()
    def _init_nodes(self, base: nn.Linear, r: int, train_bias: bool) -> None:
        from peft_kernels.ops import truncated_svd  # at call time: the op lives in its own module

        self.base = base
        base.requires_grad_(False)
        self.train_bias = bool(train_bias) and base.bias is not None
        if self.train_bias:
            base.bias.requires_grad_(True)
        w = base.weight
        # float32 or better: half-precision factors would cost the residual most of its bits.
        compute = torch.promote_types(w.dtype, torch.float32)
        U, S, Vh = truncated_svd(w.detach().to(compute), r)
        self.A = nn.Parameter(U.to(w.dtype))
        self.B = nn.Parameter((S[:, None] * Vh).to(w.dtype))
        # Subtract the product of the factors as stored, so W_res + A B reproduces W up to one
        # rounding of W_res.
        w.copy_((w.to(compute) - self.low_rank_weight(compute)).to(w.dtype))
        self.merged = False

    @property
    def rank(self) -> int:
        """The number of trainable rank-1 components (A.shape[1])."""
        return self.A.shape[1]

    @property
    def num_nodes(self) -> int:
        """Trainable nodes: the rank-1 components, plus the bias when it trains."""
        return self.rank + int(self.train_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.rank == 0:
            return self.base(x)
        w = self.base.weight
        return lora_linear(x, w, in_base_dtype(self.B, w), in_base_dtype(self.A, w), scaling=1.0,
                           bias=in_base_dtype(self.base.bias, w))

    def low_rank_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``A B`` ([out, in], detached) in ``dtype`` (default: float32 or wider)."""
        compute = dtype or torch.promote_types(self.A.dtype, torch.float32)
        return self.A.detach().to(compute) @ self.B.detach().to(compute)

    def _node_indices(self, nodes: Union[Sequence[int], Sequence[bool], Tensor, int]) -> Tensor:
        """``nodes`` as sorted unique int64 indices into the current trainable nodes."""
        where = "SVDNodeLinear.freeze_nodes"
        if isinstance(nodes, bool):
            raise TypeError(f"{where}: nodes must be indices or a bool mask, got a bool")
        if isinstance(nodes, int):
            nodes = [nodes]
        try:
            idx = torch.as_tensor(nodes)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{where}: nodes must be an int, a sequence of ints, an int tensor or "
                            f"a bool mask, got {type(nodes).__name__}") from err
        if idx.dim() != 1:
            raise ValueError(f"{where}: nodes must be 1-D, got shape {tuple(idx.shape)}")
        if idx.dtype == torch.bool:
            if idx.numel() != self.num_nodes:
                raise ValueError(f"{where}: a bool mask must have one entry per trainable node "
                                 f"({self.num_nodes}), got {idx.numel()}")
            return idx.nonzero().squeeze(1).cpu()
        if idx.numel() == 0:
            return idx.long().cpu()
        if idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"{where}: nodes must be integer indices or a bool mask, got {idx.dtype}")
        idx = idx.long().cpu()
        if idx.min() < 0 or idx.max() >= self.num_nodes:
            raise ValueError(f"{where}: node indices must lie in [0, num_nodes) = "
                             f"[0, {self.num_nodes}), got {idx.tolist()}")
        unique = torch.unique(idx)
        if unique.numel() != idx.numel():
            raise ValueError(f"{where}: node indices must be unique, got {idx.tolist()}")
        return unique

    @torch.no_grad()
    def freeze_nodes(self, nodes: Union[Sequence[int], Sequence[bool], Tensor, int]) -> None:
        """Stop training the given nodes: indices into the current trainable nodes (0..rank−1
        components, ``rank`` the bias if it trains; see :attr:`num_nodes`), or a bool mask over
        them (True = freeze).

        Each frozen component is folded into W_res (``W_res += A[:, i] B[i, :]``) and removed from
        A and B, so the rank shrinks and the outputs stay the same; the kept components keep
        their order. A frozen bias keeps its value. A and B become new Parameters: rebuild the
        optimizer afterwards.
        """
        if self.merged:
            raise RuntimeError("SVDNodeLinear.freeze_nodes: the layer is merged; unmerge() it first")
        idx = self._node_indices(nodes)
        if self.train_bias and bool((idx == self.rank).any()):
            self.train_bias = False
            self.base.bias.requires_grad_(False)
            idx = idx[idx != self.rank]
        if idx.numel() == 0:
            return
        idx = idx.to(self.A.device)
        w = self.base.weight
        compute = torch.promote_types(w.dtype, torch.float32)
        folded = self.A[:, idx].to(compute) @ self.B[idx].to(compute)
        w.copy_((w.to(compute) + folded).to(w.dtype))
        keep = torch.ones(self.rank, dtype=torch.bool, device=self.A.device)
        keep[idx] = False
        self.A = nn.Parameter(self.A[:, keep].clone(), requires_grad=self.A.requires_grad)
        self.B = nn.Parameter(self.B[keep].clone(), requires_grad=self.B.requires_grad)

    def _merge_delta(self) -> Tensor:
        return self.low_rank_weight()

    def get_extra_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "train_bias": self.train_bias, "merged": self.merged}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["rank"] != self.rank:
            raise ValueError(f"SVDNodeLinear: state has rank={state['rank']} but this layer has "
                             f"rank={self.rank}")
        train_bias = bool(state["train_bias"])
        if train_bias and self.base.bias is None:
            raise ValueError("SVDNodeLinear: state has a trainable bias but this layer has no bias")
        self.train_bias = train_bias
        if self.base.bias is not None:
            self.base.bias.requires_grad_(train_bias)
        self.merged = bool(state["merged"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint taken after freeze_nodes has a smaller rank: resize A and B to it before
        # the ordinary copy (which checks every shape).
        A, B = state_dict.get(prefix + "A"), state_dict.get(prefix + "B")
        if isinstance(A, Tensor) and isinstance(B, Tensor) and A.dim() == 2 and B.dim() == 2:
            rank = A.shape[1]
            if rank != self.rank and rank == B.shape[0] <= min(self.in_features, self.out_features):
                self.A = nn.Parameter(self.A.new_zeros(self.out_features, rank),
                                      requires_grad=self.A.requires_grad)
                self.B = nn.Parameter(self.B.new_zeros(rank, self.in_features),
                                      requires_grad=self.B.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, train_bias={self.train_bias}, merged={self.merged}")
