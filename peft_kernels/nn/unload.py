"""merge_and_unload: a fine-tuned model back to plain torch modules, for deployment."""
from __future__ import annotations

from torch import nn

from peft_kernels.nn._base import WrappedLinear
from peft_kernels.nn.lie import LieConv2d, LieLinear
from peft_kernels.nn.lora import LoRALinear
from peft_kernels.nn.orthogonal import OrthogonalConv2d, OrthogonalLinear
from peft_kernels.nn.sparse import SparseDeltaLinear
from peft_kernels.nn.svd_node import SVDNodeLinear

# Every layer of the package that wraps a frozen base module as ``self.base`` and can fold its
# update into that module's weight with ``merge()``.
ADAPTER_LAYERS = (LoRALinear, SparseDeltaLinear, SVDNodeLinear, OrthogonalLinear,
                  OrthogonalConv2d, LieLinear, LieConv2d)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter layer of ``model`` into its base and put the base module (the plain
    ``nn.Linear`` / ``nn.Conv2d``, holding the merged weight) in the layer's place.

    The result computes the same function as the fine-tuned model (up to one rounding of each
    weight's dtype) with no code of this package in its forward, and its ``state_dict`` has the
    keys of the original plain model. Layers already merged are unloaded as they are. Every layer
    is checked before any is changed: an adapter that cannot be merged (a LoRALinear with an
    activation) raises and leaves the model untouched. The base modules keep their
    ``requires_grad`` flags (frozen weights stay frozen). Returns ``model``, or the base module
    when ``model`` is itself an adapter layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge_and_unload: model must be an nn.Module, got {type(model).__name__}")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)]
    for name, layer in found:
        if isinstance(layer, WrappedLinear) and not layer.merged:
            try:
                layer._check_mergeable()
            except RuntimeError as err:
                where = f"layer {name!r}" if name else "the model"
                raise ValueError(f"merge_and_unload: {where} cannot be merged: {err}") from None
    for name, layer in found:
        if not layer.merged:
            layer.merge()
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
    return model.base if isinstance(model, ADAPTER_LAYERS) else model
