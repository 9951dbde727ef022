"""LieRA cases: LieLinear / LieConv2d forward+backward vs the pure-PyTorch reference
(``W * exp(s * (B @ A)).view_as(W)`` under autograd, then F.linear / F.conv2d) and vs full
fine-tuning of the same layer (the floor: same two GEMMs / convolutions, dW dense)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peft_kernels import reference
from peft_kernels.bench.registry import Case, Measured, register, relative_max_error
from peft_kernels.ops.lie_weight import lie_conv2d, lie_linear, lie_weight

SCALING = 1.0


def _setup(kind, x_shape, w_shape, r, dtype, device, conv_args):
    def setup() -> Measured:
        g = torch.Generator().manual_seed(0)
        K = math.prod(w_shape[1:])
        x = torch.randn(x_shape, generator=g).to(device, dtype).requires_grad_()
        w = ((torch.rand(w_shape, generator=g) * 2 - 1) / math.sqrt(K)).to(device, dtype)
        w_full = w.clone().requires_grad_()  # full fine-tuning trains W itself
        a = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device, dtype).requires_grad_()
        b = (torch.randn(w_shape[0], r, generator=g) * 0.1).to(device, dtype).requires_grad_()
        if kind == "linear":
            ours = lambda: lie_linear(x, w, a, b, scaling=SCALING)
            ref = lambda: reference.lie_linear(x, w, a, b, None, SCALING)
            full = lambda: F.linear(x, w_full)
        else:
            ours = lambda: lie_conv2d(x, w, a, b, scaling=SCALING, **conv_args)
            ref = lambda: reference.lie_conv2d(x, w, a, b, None, SCALING, **conv_args)
            full = lambda: F.conv2d(x, w_full, **conv_args)
        with torch.no_grad():
            dy = torch.randn_like(ours())

        def error() -> float:
            got = torch.autograd.grad(ours(), [x, a, b], dy)
            d = lambda t: t.detach().double().cpu().requires_grad_()
            xr, ar, br = d(x), d(a), d(b)
            if kind == "linear":
                yr = reference.lie_linear(xr, w.double().cpu(), ar, br, None, SCALING)
            else:
                yr = reference.lie_conv2d(xr, w.double().cpu(), ar, br, None, SCALING, **conv_args)
            want = torch.autograd.grad(yr, [xr, ar, br], dy.double().cpu())
            return relative_max_error(got, want)

        return Measured(
            kernel=lambda: torch.autograd.grad(ours(), [x, a, b], dy),
            baseline=lambda: torch.autograd.grad(ref(), [x, a, b], dy),
            floor=lambda: torch.autograd.grad(full(), [x, w_full], dy),
            error=error,
            tolerance={torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype],
        )

    return setup


def _register(kind, label, x_shape, w_shape, r, dtype, device, conv_args=None):
    register(Case(
        name=f"Lie{'Linear' if kind == 'linear' else 'Conv2d'} fwd+bwd {label} r={r} "
             f"{str(dtype).replace('torch.', '')}",
        op="lie_weight", device=device,
        setup=_setup(kind, x_shape, w_shape, r, dtype, device, conv_args or {}),
        baseline_name="pure-PyTorch LieRA (W * exp(s·BA) under autograd)",
        floor_name="full fine-tuning of the layer (dense dW)",
    ))


_register("linear", "N=4096 1024->1024", (4096, 1024), (1024, 1024), 16, torch.float32, "cpu")
_register("conv", "64->64 3x3 on [32, 64, 32, 32]", (32, 64, 32, 32), (64, 64, 3, 3), 16,
          torch.float32, "cpu", dict(padding=1))
_register("linear", "N=8192 4096->4096", (8192, 4096), (4096, 4096), 16, torch.bfloat16, "cuda")
_register("conv", "ResNet-50 stage 3 256->256 3x3 on [64, 256, 14, 14]", (64, 256, 14, 14),
          (256, 256, 3, 3), 16, torch.bfloat16, "cuda", dict(padding=1))


def _setup_weight(w_shape, r, dtype, device):
    """The weight generation alone, W * exp(s B A), and its backward given a weight gradient."""
    def setup() -> Measured:
        g = torch.Generator().manual_seed(0)
        K = math.prod(w_shape[1:])
        w = ((torch.rand(w_shape, generator=g) * 2 - 1) / math.sqrt(K)).to(device, dtype)
        a = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device, dtype).requires_grad_()
        b = (torch.randn(w_shape[0], r, generator=g) * 0.1).to(device, dtype).requires_grad_()
        grad = torch.randn(w_shape, generator=g).to(device, dtype)
        ours = lambda: lie_weight(w, a, b, scaling=SCALING)
        ref = lambda: w * torch.exp(SCALING * (b @ a)).view_as(w)

        def error() -> float:
            got = torch.autograd.grad(ours(), [a, b], grad)
            d = lambda t: t.detach().double().cpu().requires_grad_()
            ar, br = d(a), d(b)
            yr = w.double().cpu() * torch.exp(SCALING * (br @ ar)).view_as(w)
            return relative_max_error(got, torch.autograd.grad(yr, [ar, br], grad.double().cpu()))

        return Measured(
            kernel=lambda: torch.autograd.grad(ours(), [a, b], grad),
            baseline=lambda: torch.autograd.grad(ref(), [a, b], grad),
            error=error,
            tolerance={torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype],
        )

    return setup


def _register_weight(w_shape, r, dtype, device):
    shape = "x".join(str(d) for d in w_shape)
    register(Case(
        name=f"lie_weight fwd+bwd {shape} r={r} {str(dtype).replace('torch.', '')}",
        op="lie_weight", device=device, setup=_setup_weight(w_shape, r, dtype, device),
        baseline_name="W * exp(s·BA) under autograd",
    ))


_register_weight((1024, 1024), 16, torch.float32, "cpu")
_register_weight((4096, 4096), 16, torch.bfloat16, "cuda")
