"""SPT: sensitivity-aware parameter-efficient tuning (He et al., ICCV 2023, arXiv:2303.08566).

Three steps, one function each:

1. :func:`sensitivity` scores every weight entry of the candidate ``nn.Linear`` modules by its
   accumulated squared gradient ``s_w = Σ_batches (∂L/∂w)²`` (one pass over a few batches).
2. :func:`spt_plan` takes the global top-τ entries over all candidates, with τ chosen so the
   trainable count meets a budget, and decides per matrix: a structured layer (LoRA or a parallel
   adapter) when it holds many sensitive entries, else exactly its sensitive entries (sparse).
3. :func:`apply_plan` swaps the modules for :class:`~peft_kernels.nn.LoRALinear` /
   :class:`~peft_kernels.nn.sparse.SparseDeltaLinear` and freezes everything else.

Only ``nn.Linear`` weights are candidates; SPT's optional whole-vector tuning of norm and bias
vectors is not part of this module.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from peft_kernels.nn.convert import adapter_internals
from peft_kernels.nn.lora import LoRALinear
from peft_kernels.nn.sparse import SparseDeltaLinear

__all__ = ["sensitivity", "spt_plan", "apply_plan", "SPTPlan", "SPTEntry"]

# Structured mode -> the LoRALinear activation that realises it.
_STRUCTURED = {"lora": None, "adapter": "relu"}


# ----------------------------------------------------------------------------------------------
# 1. sensitivity
# ----------------------------------------------------------------------------------------------

class _Progress:
    """A carriage-return progress line on stderr (the package does not depend on tqdm)."""

    def __init__(self, total: Optional[int], enabled: bool, label: str):
        self.total, self.enabled, self.label = total, enabled, label
        self.shown = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\r{self.label}: {done}{of} batches")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _linear_names(model: nn.Module) -> list[str]:
    """The candidate Linears: every nn.Linear except the frozen bases inside adapter layers."""
    inside = adapter_internals(model)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name not in inside]


def _check_not_inside_adapter(model: nn.Module, name: str, where: str, what: str) -> None:
    inside = adapter_internals(model)
    if name in inside:
        raise ValueError(f"{where}: {what} {name!r}, the frozen base of the adapter layer "
                         f"{inside[name]!r}; it is not a candidate")


def _resolve_targets(
    model: nn.Module, targets: Optional[Iterable[str]], exclude: Optional[Iterable[str]]
) -> list[str]:
    linears = _linear_names(model)
    if targets is None:
        if exclude is None:
            if not linears:
                raise ValueError("sensitivity: model has no nn.Linear module to score")
            exclude = [linears[-1]]  # the head
        else:
            exclude = [exclude] if isinstance(exclude, str) else list(exclude)
            unknown = [n for n in exclude if n not in linears]
            if unknown:
                raise ValueError(f"sensitivity: exclude names {unknown} that are not nn.Linear modules of the model")
        dropped = set(exclude)
        names = [n for n in linears if n not in dropped]
        if not names:
            raise ValueError(
                f"sensitivity: no candidate left: every nn.Linear of the model is excluded ({sorted(dropped)})"
            )
        return names
    if exclude is not None:
        raise ValueError("sensitivity: pass either targets or exclude, not both")
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = list(dict.fromkeys(targets))  # drop repeats, keep the order
    if not names:
        raise ValueError("sensitivity: targets is empty")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"sensitivity: targets must be module names (str), got {type(name).__name__}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"sensitivity: targets names {name!r}, which is not a module of the model") from None
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"sensitivity: targets names {name!r}, a {type(module).__name__}; only nn.Linear modules are candidates"
            )
        _check_not_inside_adapter(model, name, "sensitivity", "targets names")
    return names


def sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    targets: Optional[Iterable[str]] = None,
    progress: bool = True,
    *,
    exclude: Optional[Iterable[str]] = None,
) -> dict[str, Tensor]:
    """Accumulated squared gradients ``Σ_batches (∂L/∂W)²`` of the candidate weight matrices.

    Args:
        model: the pretrained model.
        batches: any iterable (a DataLoader, a list); each item is passed to ``loss_fn``.
            SPT uses a few batches (its code: 16 batches of 32 samples).
        loss_fn: ``loss_fn(model, batch) -> scalar loss tensor``.
        targets: names (as in ``model.named_modules()``) of the ``nn.Linear`` modules to score.
            Default: every ``nn.Linear`` except those named in ``exclude``. The frozen base
            Linears inside this package's adapter layers are never candidates.
        progress: print a progress line to stderr.
        exclude: names left out of the default targets (only with ``targets=None``). Default: the
            head, defined as the *last* ``nn.Linear`` in ``model.named_modules()`` order (the
            classifier of ViTs, BERTs and MLPs). Pass ``exclude=[]`` to score every Linear, or
            name the head yourself when the last-registered Linear is not the head.

    Returns:
        ``{module name: scores}`` with scores of the weight's shape ``[out, in]`` on its device,
        float32 (float64 for float64 weights), in target order.

    The loss is computed in the model's current mode (``model.train()`` / ``model.eval()`` as
    the caller left it: dropout is active in train mode). Only the target weights require grad
    during the pass, so no gradient of any other parameter is computed. Each weight's gradient is
    squared into its score by a post-accumulate hook and freed at once, so at most one gradient
    per weight exists at any time. Afterwards every parameter's ``requires_grad`` flag, the
    targets' previous ``.grad`` and every submodule's training flag are restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sensitivity: model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"sensitivity: loss_fn must be callable, got {type(loss_fn).__name__}")
    names = _resolve_targets(model, targets, exclude)

    scores: dict[str, Tensor] = {}
    by_param: dict[int, tuple[nn.Parameter, list[Tensor]]] = {}
    for name in names:
        w = model.get_submodule(name).weight
        s = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
        scores[name] = s
        # Tied weights: one hook per parameter, feeding every module that uses it.
        by_param.setdefault(id(w), (w, []))[1].append(s)

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    saved_grads = [(w, w.grad) for w, _ in by_param.values()]

    def make_hook(outs: list[Tensor]):
        def hook(p: Tensor) -> None:
            g = p.grad
            p.grad = None
            for s in outs:
                gs = g.detach().to(s.dtype)
                s.addcmul_(gs, gs)
        return hook

    try:
        total: Optional[int] = len(batches)  # type: ignore[arg-type]
    except TypeError:  # generators, iterable-style DataLoaders
        total = None
    bar = _Progress(total, progress, "sensitivity")
    handles = []
    count = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for w, outs in by_param.values():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(make_hook(outs)))
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError("sensitivity: loss_fn must return a scalar loss tensor")
                if not loss.requires_grad:
                    raise ValueError("sensitivity: the loss does not depend on any target weight")
                loss.reshape(()).backward()
                count += 1
                bar.update(count)
        if count == 0:
            raise ValueError("sensitivity: batches is empty")
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for w, g in saved_grads:
            w.grad = g
        for m, mode in modes:
            m.training = mode
    return scores


# ----------------------------------------------------------------------------------------------
# 2. allocation
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SPTEntry:
    """One candidate matrix of an :class:`SPTPlan`.

    ``kind`` is "lora", "adapter", "sparse" or "none"; ``sensitive`` is σ_W, its number of entries
    among the global top-τ; ``trainable`` the parameters it gets; ``indices`` (sparse only) the
    sorted flat row-major int64 indices of its sensitive entries, on the CPU.
    """

    name: str
    shape: tuple[int, int]
    kind: str
    sensitive: int
    trainable: int
    indices: Optional[Tensor] = None


@dataclass(frozen=True, eq=False)
class SPTPlan:
    """The result of :func:`spt_plan`: per-module decisions and their total trainable count."""

    entries: tuple[SPTEntry, ...]
    total: int
    budget: int
    tau: int
    r: int
    alpha: float
    structured: str

    def __getitem__(self, name: str) -> SPTEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def table(self) -> str:
        """An aligned table: one row per module, then the totals."""
        head = ("module", "shape", "kind", "sensitive", "trainable")
        rows = [(e.name, f"{e.shape[0]}x{e.shape[1]}", e.kind, str(e.sensitive), str(e.trainable))
                for e in self.entries]
        foot = ("total", "", "", str(self.tau), str(self.total))
        widths = [max(len(row[i]) for row in [head, foot, *rows]) for i in range(5)]

        def fmt(row) -> str:
            left = [row[i].ljust(widths[i]) for i in range(3)]
            right = [row[i].rjust(widths[i]) for i in range(3, 5)]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(fmt(tuple("x" * w for w in widths)))
        kinds = {}
        for e in self.entries:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        summary = ", ".join(f"{k} {n}" for k, n in kinds.items())
        lines = [fmt(head), rule, *map(fmt, rows), rule, fmt(foot),
                 f"budget {self.budget}, tau {self.tau}, r {self.r}, alpha {self.alpha:g}, "
                 f"structured {self.structured!r} ({summary})"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def structured_count(shape: tuple[int, int], r: int) -> int:
    """Trainable count P_struct of the structured layer apply_plan creates for an [out, in] weight.

    LoRALinear holds ``lora_A [r, in]`` and ``lora_B [out, r]`` in both modes: ``r · (in + out)``.
    """
    out_f, in_f = shape
    return r * (in_f + out_f)


def spt_plan(
    scores: dict[str, Tensor],
    budget: int,
    *,
    r: int = 8,
    alpha: float = 10.0,
    structured: str = "lora",
) -> SPTPlan:
    """Allocate a trainable-parameter budget from sensitivity scores (SPT, steps 2 and 3).

    All entries of all matrices are ranked together by score (descending; ties keep the order
    of ``scores`` and then the row-major position, so the result is deterministic). For a cut τ,
    a matrix W with σ_W entries among the top τ is tuned

    * structurally when ``σ_W ≥ P_struct / alpha``, costing ``P_struct`` parameters,
    * else through exactly those σ_W entries (sparse), costing σ_W,
    * not at all when σ_W = 0.

    τ is found by binary search over ``[0, total entries]`` as a cut whose trainable count is
    ``≤ budget`` while one more entry would exceed it. For ``alpha ≥ 1`` the count never falls
    as τ grows, so this τ is the largest one within the budget and its count is the largest
    reachable count ``≤ budget``; it falls short of the budget by less than one structured block
    (the jump taken when the next entry turns a matrix structured). If even the first entry does
    not fit, τ = 0 and nothing is tuned.

    Args:
        scores: ``{module name: [out, in] scores}``, e.g. from :func:`sensitivity`.
        budget: the most trainable parameters, ``1 ≤ budget ≤`` total candidate entries.
        r: rank of the structured layer.
        alpha: SPT's α (10 in the paper); larger means structured tuning kicks in earlier.
        structured: "lora" (LoRALinear, ``activation=None``) or "adapter" (LoRALinear with
            ``activation="relu"``: a parallel bottleneck adapter ``x + relu(x Aᵀ) Bᵀ`` beside W).
            Both cost ``P_struct = r · (in + out)``. SPT's adapter is a sequential bottleneck with
            biases on W's output, ``2 · r · out + r + out``; this package's fused adapter reads
            W's input and has no bottleneck biases, and P_struct must be the count of the layer
            actually created so that the plan's total equals the model's trainable count after
            :func:`apply_plan`. For square W the two differ only by the ``r + out`` biases.

    Returns:
        An :class:`SPTPlan`.
    """
    if not isinstance(scores, dict):
        raise TypeError(f"spt_plan: scores must be a dict of module name -> tensor, got {type(scores).__name__}")
    if not scores:
        raise ValueError("spt_plan: scores is empty")
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"spt_plan: r must be an int, got {type(r).__name__}")
    if r < 1:
        raise ValueError(f"spt_plan: r must be >= 1, got {r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"spt_plan: alpha must be a number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"spt_plan: alpha must be a finite number > 0, got {alpha}")
    if structured not in _STRUCTURED:
        raise ValueError(f"spt_plan: structured must be 'lora' or 'adapter', got {structured!r}")
    if isinstance(budget, bool):
        raise TypeError("spt_plan: budget must be an int, got bool")
    try:
        budget = operator.index(budget)
    except TypeError:
        raise TypeError(f"spt_plan: budget must be an int, got {type(budget).__name__}") from None

    names = list(scores)
    tensors = []
    for name in names:
        t = scores[name]
        if not isinstance(name, str):
            raise TypeError(f"spt_plan: scores keys must be module names (str), got {type(name).__name__}")
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"spt_plan: scores[{name!r}] must be a floating-point tensor")
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"spt_plan: scores[{name!r}] must be a non-empty [out, in] matrix, got shape {tuple(t.shape)}")
        if torch.isnan(t).any():
            raise ValueError(f"spt_plan: scores[{name!r}] contains NaN")
        tensors.append(t.detach())
    numels = [t.numel() for t in tensors]
    n_total = sum(numels)
    if not 1 <= budget <= n_total:
        raise ValueError(f"spt_plan: budget must be in [1, {n_total}] (the candidates' entry count), got {budget}")

    device = tensors[0].device
    work = reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    flat = torch.cat([t.to(device=device, dtype=work).reshape(-1) for t in tensors])
    # Stable sort: equal scores keep (module order, row-major position), making ties deterministic.
    order = torch.sort(flat, descending=True, stable=True).indices
    del flat
    ends = torch.tensor(numels, device=device).cumsum(0)
    owner = torch.bucketize(order, ends, right=True)  # module index of each ranked entry
    p_struct = [structured_count(tuple(t.shape), r) for t in tensors]
    threshold = [p / alpha for p in p_struct]
    m = len(tensors)

    def sigma(tau: int) -> list[int]:
        return torch.bincount(owner[:tau], minlength=m).tolist()

    def cost(sig: list[int]) -> int:
        return sum(p if s >= th else s for s, p, th in zip(sig, p_struct, threshold))

    # Invariant: cost(lo) <= budget < cost(hi); cost(0) = 0 < budget.
    if cost(sigma(n_total)) <= budget:
        tau = n_total
    else:
        lo, hi = 0, n_total
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost(sigma(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        tau = lo

    sig = sigma(tau)
    # Sorting the kept global positions groups them by module, each group row-major sorted.
    chosen = torch.split(torch.sort(order[:tau]).values.cpu(), sig)
    starts = [0]
    for n in numels[:-1]:
        starts.append(starts[-1] + n)
    entries = []
    for name, t, s, p, th, idx, start in zip(names, tensors, sig, p_struct, threshold, chosen, starts):
        shape = (int(t.shape[0]), int(t.shape[1]))
        if s == 0:
            entries.append(SPTEntry(name, shape, "none", 0, 0))
        elif s >= th:
            entries.append(SPTEntry(name, shape, structured, s, p))
        else:
            entries.append(SPTEntry(name, shape, "sparse", s, s, (idx - start).to(torch.int64)))
    total = sum(e.trainable for e in entries)
    return SPTPlan(tuple(entries), total, budget, tau, r, float(alpha), structured)


# ----------------------------------------------------------------------------------------------
# 3. application
# ----------------------------------------------------------------------------------------------

def apply_plan(
    model: nn.Module,
    plan: SPTPlan,
    *,
    lora_alpha: Optional[float] = None,
    dropout: float = 0.0,
    train_head: Union[bool, str] = False,
) -> nn.Module:
    """Swap the planned modules in place and freeze everything else; returns ``model``.

    "lora"/"adapter" entries become ``LoRALinear.from_linear(linear, plan.r, alpha=lora_alpha,
    dropout=dropout, activation=None / "relu")`` (``lora_alpha=None`` means scaling 1);
    "sparse" entries become ``SparseDeltaLinear.from_linear(linear, indices)``; "none" entries
    stay as they are. Both new layers equal their base at init, so the model computes the same
    function right after this call.

    SPT tunes only the selected parts: every other parameter of the model is frozen, including
    the head, so the model's trainable parameter count equals ``plan.total`` exactly. With
    ``train_head=True`` the head (the last ``nn.Linear`` in ``model.named_modules()`` order, the
    same rule :func:`sensitivity` uses to exclude it) stays trainable as well; a string names the
    head module instead. The head must then not be part of the plan.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_plan: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, SPTPlan):
        raise TypeError(f"apply_plan: plan must be an SPTPlan, got {type(plan).__name__}")

    head = None
    if isinstance(train_head, str):
        head = train_head
    elif train_head is True:
        linears = _linear_names(model)
        if not linears:
            raise ValueError("apply_plan: train_head=True but the model has no nn.Linear")
        head = linears[-1]
    elif train_head is not False:
        raise TypeError(f"apply_plan: train_head must be a bool or a module name, got {type(train_head).__name__}")
    if head is not None:
        try:
            head_module = model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"apply_plan: train_head names {head!r}, which is not a module of the model") from None
        if any(e.name == head and e.kind != "none" for e in plan.entries):
            raise ValueError(f"apply_plan: the head {head!r} is part of the plan; it cannot also be trained whole")

    # Check the whole plan first, so a bad plan leaves the model untouched.
    todo = []
    for e in plan.entries:
        if e.kind == "none":
            continue
        if e.kind not in ("lora", "adapter", "sparse"):
            raise ValueError(f"apply_plan: entry {e.name!r} has unknown kind {e.kind!r}")
        if e.name == "":
            raise ValueError("apply_plan: the plan names the model itself; only submodules can be replaced")
        try:
            module = model.get_submodule(e.name)
        except AttributeError:
            raise ValueError(f"apply_plan: plan entry {e.name!r} is not a module of the model") from None
        if not isinstance(module, nn.Linear):
            raise TypeError(f"apply_plan: plan entry {e.name!r} is a {type(module).__name__}, expected nn.Linear")
        _check_not_inside_adapter(model, e.name, "apply_plan", "plan entry")
        if tuple(module.weight.shape) != tuple(e.shape):
            raise ValueError(
                f"apply_plan: plan entry {e.name!r} has shape {tuple(e.shape)} but the module's weight is "
                f"{tuple(module.weight.shape)}"
            )
        todo.append((e, module))

    model.requires_grad_(False)
    for e, module in todo:
        if e.kind == "sparse":
            new = SparseDeltaLinear.from_linear(module, e.indices)
        else:
            new = LoRALinear.from_linear(
                module, plan.r, alpha=lora_alpha, dropout=dropout, activation=_STRUCTURED[e.kind]
            )
        parent_name, _, child = e.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    if head is not None:
        head_module.requires_grad_(True)
    return model
