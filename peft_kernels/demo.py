"""`python -m peft_kernels demo`: every PEFT family of the package fine-tunes the same pretrained
model on a small synthetic task, with no download.

A 3-layer MLP is pre-trained on one 10-class task (Gaussian class prototypes through a fixed
nonlinear warp); the downstream task moves the prototypes. Each method adapts the two hidden
linears (the head trains in every method) for the same number of steps; the table gives the
trainable parameters, the downstream test accuracy, the time per training step, and for methods
that merge, the largest output change of ``merge_and_unload`` (the deployed plain model). A
result on a toy task, not a benchmark: `python -m peft_kernels bench` measures the kernels.

The task and the training loop are shared with the scripts in examples/.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Callable, Optional

import torch
from torch import nn

HIDDEN_LINEARS = ["0", "2"]  # the two hidden nn.Linear of mlp(): Sequential indices
HEAD = "4"


def make_task(seed: int, n: int, dim: int, classes: int = 10, shift: float = 0.0,
              warp_scale: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples ``(x [n, dim], labels [n])``; ``shift`` moves the class prototypes, making a
    related task for a model pre-trained at ``shift = 0``. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(classes, dim, generator=g) * 2.0
    if shift:
        protos = protos + shift * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + torch.randn(n, dim, generator=g) * 3.0
    # A fixed nonlinear warp (a different one downstream) makes the task need the hidden layers.
    warp = torch.randn(dim, dim, generator=torch.Generator().manual_seed(7 + int(shift > 0)))
    return torch.tanh(x @ warp / warp_scale), y


def mlp(dim: int, hidden: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, classes))


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, *,
          batch: int = 256, seed: int = 0) -> float:
    """AdamW on the trainable parameters over random batches; returns seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / max(steps, 1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was_training)
    return acc


def _methods(x_sens: torch.Tensor, y_sens: torch.Tensor, lora_budget: int
             ) -> list[tuple[str, float, Callable[[nn.Module], None]]]:
    """(name, learning rate, adapt) with adapt(model) turning the pretrained model's hidden
    linears into the method's layers in place (everything else frozen but the head)."""
    import peft_kernels as pk

    def inject(make):
        return lambda model: pk.nn.inject_adapters(model, HIDDEN_LINEARS, make)

    def full(model):
        model.requires_grad_(True)

    def head_only(model):
        model.requires_grad_(False)

    def spt(model):
        # SPT: squared-gradient sensitivity on a few batches, then the budget of the LoRA row
        # split between low-rank and sparse updates by the plan.
        batches = [(x_sens[i:i + 64], y_sens[i:i + 64]) for i in range(0, 512, 64)]
        scores = pk.select.sensitivity(
            model, batches, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
            targets=HIDDEN_LINEARS, progress=False)
        plan = pk.select.spt_plan(scores, lora_budget, r=4, alpha=10)
        pk.select.apply_plan(model, plan, lora_alpha=8)

    return [
        ("head only", 3e-3, head_only),
        ("full fine-tuning", 1e-3, full),
        ("LoRA r=4", 3e-3, inject(lambda m: pk.nn.LoRALinear.from_linear(m, 4, alpha=8, dropout=0.05))),
        ("PiSSA r=4", 3e-3, inject(lambda m: pk.nn.LoRALinear.from_linear(m, 4, alpha=4, init="pissa"))),
        ("parallel adapter r=4 relu", 3e-3,
         inject(lambda m: pk.nn.LoRALinear.from_linear(m, 4, alpha=8, activation="relu"))),
        ("SPT (LoRA's budget)", 3e-3, spt),
        ("orthogonal b=8 (OFT)", 3e-3, inject(lambda m: pk.nn.OrthogonalLinear.from_linear(m, 8))),
        ("LieRA r=4", 3e-3, inject(lambda m: pk.nn.LieLinear.from_linear(m, 4, alpha=8))),
        ("SVD nodes r=8", 3e-3, inject(lambda m: pk.nn.SVDNodeLinear.from_linear(m, 8))),
    ]


def run(steps: int = 300, *, dim: int = 64, hidden: int = 256, threads: Optional[int] = None,
        out=print) -> list[dict]:
    """Pre-train, adapt with every method, print the table; returns its rows."""
    import peft_kernels as pk

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    xa, ya = make_task(0, 8000, dim)
    xb, yb = make_task(1, 2000, dim, shift=2.0)
    xt, yt = make_task(2, 4000, dim, shift=2.0)
    base = mlp(dim, hidden)
    train(base, xa, ya, 2 * steps, 3e-3)
    out(f"pre-trained on task A ({2 * steps} steps); task-B test accuracy before adapting: "
        f"{accuracy(base, xt, yt):.3f}")

    probe = copy.deepcopy(base)
    pk.nn.inject_adapters(probe, HIDDEN_LINEARS, lambda m: pk.nn.LoRALinear.from_linear(m, 4))
    lora_budget = trainable_count(probe)

    rows = []
    header = f"{'method':<27} {'trainable':>9} {'task-B acc':>10} {'ms/step':>8} {'merge Δ':>9}"
    out(header)
    out("-" * len(header))
    for name, lr, adapt in _methods(xb, yb, lora_budget):
        model = copy.deepcopy(base)
        adapt(model)
        model.get_submodule(HEAD).requires_grad_(True)
        count = trainable_count(model)
        seconds = train(model, xb, yb, steps, lr)
        acc = accuracy(model, xt, yt)
        merge_delta = None
        nonlinear = any(isinstance(m, pk.nn.LoRALinear) and m.activation is not None
                        for m in model.modules())  # no merged form
        if not nonlinear and name not in ("head only", "full fine-tuning"):
            model.eval()
            with torch.no_grad():
                before = model(xt)
                merged = pk.nn.merge_and_unload(model)
                merge_delta = (merged(xt) - before).abs().max().item()
        rows.append(dict(method=name, trainable=count, accuracy=acc, ms_per_step=1e3 * seconds,
                         merge_max_abs_diff=merge_delta))
        delta = "-" if merge_delta is None else f"{merge_delta:.1e}"
        out(f"{name:<27} {count:>9} {acc:>10.3f} {1e3 * seconds:>8.2f} {delta:>9}")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per method")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def main(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise SystemExit(f"demo: --steps must be >= 1, got {args.steps}")
    run(args.steps, threads=args.threads)
    return 0
