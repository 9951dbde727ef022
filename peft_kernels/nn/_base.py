"""What the layers that wrap a frozen ``nn.Linear`` (kept as ``self.base``) share."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def in_base_dtype(t: Optional[Tensor], base_weight: Tensor) -> Optional[Tensor]:
    """``t`` in the frozen weight's dtype, which the ops compute in. Adapter parameters kept
    wider than a half-precision base (float32 master weights, as PEFT scripts upcast the
    trainable parameters) enter through a differentiable cast: their gradients come back in
    their own dtype."""
    return t if t is None or t.dtype == base_weight.dtype else t.to(base_weight.dtype)


class WrappedLinear(nn.Module):
    """A frozen ``self.base`` linear plus an update that ``merge()`` can fold into its weight.

    Subclasses set ``self.merged``, implement :meth:`_merge_delta` (the update, in its own
    dtype) and may refuse merging in :meth:`_check_mergeable`; the weight is updated in
    float32 or wider, so merge and unmerge cost one rounding of the weight's dtype each."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _merge_delta(self) -> Tensor:
        raise NotImplementedError

    def _check_mergeable(self) -> None:
        pass

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; forward then costs one plain linear."""
        self._check_mergeable()
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge: already merged")
        self._add_to_base(self._merge_delta())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to the rounding of the weight's dtype)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: not merged")
        self._add_to_base(-self._merge_delta())
        self.merged = False

    def _add_to_base(self, delta: Tensor) -> None:
        w = self.base.weight
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
