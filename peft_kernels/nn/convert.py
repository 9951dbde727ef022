"""A model's modules to adapter layers (inject_adapters) and back to plain torch modules for
deployment (merge_and_unload)."""
from __future__ import annotations

from typing import Callable, Iterable, Union

import torch
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


Targets = Union[str, Iterable[str], Callable[[str, nn.Module], bool]]


def _selector(targets: Targets) -> Callable[[str, nn.Module], bool]:
    if callable(targets):
        return targets
    message = ("inject_adapters: targets must be a module name, a non-empty iterable of module "
               f"names, or a callable (name, module) -> bool, got {targets!r}")
    try:
        names = [targets] if isinstance(targets, str) else list(targets)
    except TypeError:
        raise TypeError(message) from None
    if not names or not all(isinstance(t, str) and t for t in names):
        raise TypeError(message)
    return lambda name, module: any(name == t or name.endswith("." + t) for t in names)


def adapter_internals(model: nn.Module) -> dict[str, str]:
    """The modules inside the adapter layers of ``model`` (each layer's frozen base and what is
    under it), by ``named_modules()`` name, each mapped to the name of its adapter layer."""
    inside: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, ADAPTER_LAYERS):
            for sub, _ in module.named_modules(prefix=name, remove_duplicate=False):
                if sub != name:
                    inside.setdefault(sub, name)
    return inside


def _give_back(layer: nn.Module) -> None:
    """Undo the weight change of a finished adapter build: PiSSA and SVD nodes move part of W
    into the adapter, so W_res + update is merged back (W up to one rounding). The other layers
    start at the identity update and leave the base weight as it was."""
    moved = (isinstance(layer, SVDNodeLinear)
             or (isinstance(layer, LoRALinear) and layer.activation is None
                 and bool(layer.lora_B.detach().ne(0).any())))
    if moved and not layer.merged:
        layer.merge()


def inject_adapters(model: nn.Module, targets: Targets,
                    make: Callable[[nn.Module], nn.Module], *, freeze: bool = True
                    ) -> dict[str, nn.Module]:
    """Replace the submodules of ``model`` that ``targets`` selects by ``make(module)``.

    ``targets`` is a module name or an iterable of them, matching a module whose name equals one
    or ends with ``"." + name`` (as HF PEFT's ``target_modules``: ``["q_proj", "v_proj"]``), or a
    callable ``(name, module) -> bool``. A module inside one already selected is left to it; a
    module shared by several parents gets one replacement, shared the same way. Selecting a
    module inside an adapter layer of this package (its frozen base) is an error.
    ``make`` builds the replacement, e.g. ``lambda m: pk.nn.LoRALinear.from_linear(m, 8)``.
    With ``freeze`` (default) every other parameter of the model is frozen, so only what the
    new layers train (their adapter parameters; an SVD-node layer's bias) trains.

    Every replacement is built before the model is changed. If ``make`` raises, the model is
    given back as it was: the ``requires_grad`` flags are restored, and a PiSSA or SVD-node layer
    built before the failure merges its share of W back into the module (W to one rounding).
    Returns the new modules by name; raises ValueError when nothing matches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_adapters: model must be an nn.Module, got {type(model).__name__}")
    if not callable(make):
        raise TypeError(f"inject_adapters: make must be callable, got {type(make).__name__}")
    selected = _selector(targets)
    inside = adapter_internals(model)
    chosen: list[tuple[str, nn.Module]] = []
    # Every path, so a module shared by two parents is replaced in both (by one new module).
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(c + ".") for c, _ in chosen):
            continue
        if selected(name, module):
            if name in inside:
                raise ValueError(f"inject_adapters: targets select {name!r}, which is inside the "
                                 f"adapter layer {inside[name]!r}; target that layer's own name, "
                                 "or merge_and_unload the model first")
            chosen.append((name, module))
    if not chosen:
        raise ValueError("inject_adapters: targets matched no submodule of the model")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    built, by_id = {}, {}
    try:
        for name, module in chosen:
            if id(module) not in by_id:
                new = make(module)
                if not isinstance(new, nn.Module):
                    raise TypeError(f"inject_adapters: make returned {type(new).__name__} for "
                                    f"{name!r}, expected an nn.Module")
                by_id[id(module)] = new
            built[name] = by_id[id(module)]
    except BaseException:
        with torch.no_grad():
            for new in by_id.values():
                _give_back(new)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    if freeze:
        # What the new layers train may include parameters of the modules they wrap (an SVD-node
        # layer's bias), which freezing the model would reach through the old module too.
        trainable = [p for new in by_id.values() for p in new.parameters() if p.requires_grad]
        model.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
    for name, new in built.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return built


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
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, ADAPTER_LAYERS)]  # a shared layer: merged once, unloaded everywhere
    for name, layer in found:
        if isinstance(layer, (WrappedLinear, LieLinear, LieConv2d)) and not layer.merged:
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
