"""expm cases: the batched kernel vs torch.linalg.matrix_exp (forward and forward+backward), and
OrthogonalLinear vs the pure-PyTorch OFT-style layer (dense block-diagonal rotation folded into
the weight each call) with the frozen base linear as the floor.

Inputs are skew-symmetric generators S = K − Kᵀ with K ~ N(0, 1/n²), so ‖S‖₁ ≈ 1: rotations
of moderate angle (degree 12-18 with at most one squaring), neither the trivial start of
training (S = 0) nor an extreme."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peft_kernels.bench.registry import Case, Measured, register, relative_max_error
from peft_kernels.nn.orthogonal import OrthogonalLinear
from peft_kernels.ops import expm


def _generators(batch, n, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(batch, n, n, generator=g, dtype=torch.float64) / n
    return (K - K.mT).to(device, dtype)


def _expm_setup(batch, n, dtype, device, backward):
    def setup() -> Measured:
        S = _generators(batch, n, device, dtype).requires_grad_(backward)
        G = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(1)).to(device, dtype)

        def run(fn, A):
            if not backward:
                with torch.no_grad():
                    return fn(A)
            return torch.autograd.grad(fn(A), A, G.to(A.device, A.dtype))

        def error() -> float:
            got = run(expm, S)
            S64 = S.detach().double().cpu().requires_grad_(backward)
            want = run(torch.linalg.matrix_exp, S64) if backward else torch.linalg.matrix_exp(S64)
            return relative_max_error(got, want)

        return Measured(
            kernel=lambda: run(expm, S),
            baseline=lambda: run(torch.linalg.matrix_exp, S),
            error=error,
            tolerance={torch.float32: 1e-5, torch.float64: 1e-12}[dtype],
        )

    return setup


def _skew(params, b):
    rows, cols = torch.triu_indices(b, b, 1, device=params.device)
    K = params.new_zeros(params.shape[0], b, b)
    K[:, rows, cols] = params
    return K - K.mT


def _oft_pure_pytorch(x, weight, bias, params, b, rotation_map):
    """OFT as pure-PyTorch PEFT code writes it: per-block rotations, torch.block_diag into a dense
    in×in matrix, folded into the weight every call."""
    S = _skew(params, b)
    if rotation_map == "expm":
        R = torch.linalg.matrix_exp(S)
    else:  # Cayley
        eye = torch.eye(b, dtype=S.dtype, device=S.device).expand_as(S)
        R = torch.linalg.solve(eye - S, eye + S)
    return F.linear(x, weight @ torch.block_diag(*R), bias)


def _oft_setup(n_tokens, features, b, dtype, device, rotation_map):
    def setup() -> Measured:
        g = torch.Generator().manual_seed(0)
        bound = 1 / math.sqrt(features)
        linear = torch.nn.Linear(features, features).to(device, dtype)
        with torch.no_grad():
            linear.weight.copy_((torch.rand(features, features, generator=g) * 2 - 1) * bound)
        layer = OrthogonalLinear.from_linear(linear, b)
        k = features // b
        with torch.no_grad():
            layer.oft_params.copy_(torch.randn(k, b * (b - 1) // 2, generator=g) / b)
        params = layer.oft_params
        x = torch.randn(n_tokens, features, generator=g).to(device, dtype).requires_grad_()
        dy = torch.randn(n_tokens, features, generator=g).to(device, dtype)
        w, bias = linear.weight, linear.bias

        def kernel():
            return torch.autograd.grad(layer(x), [x, params], dy)

        def baseline():
            y = _oft_pure_pytorch(x, w, bias, params, b, rotation_map)
            return torch.autograd.grad(y, [x, params], dy)

        def error() -> float:
            d = lambda t: t.detach().double().cpu().requires_grad_()
            xr, pr = d(x), d(params)
            yr = _oft_pure_pytorch(xr, w.double().cpu(), bias.double().cpu(), pr, b, "expm")
            want = torch.autograd.grad(yr, [xr, pr], dy.double().cpu())
            return relative_max_error(kernel(), want)

        return Measured(
            kernel=kernel,
            baseline=baseline,
            floor=lambda: torch.autograd.grad(F.linear(x, w, bias), [x], dy),
            error=error,
            tolerance=1e-4,
        )

    return setup


for _device in ("cpu", "cuda"):
    for _batch, _n in ((6912, 8), (1152, 32), (96, 64), (8, 256)):
        for _backward in (False, True):
            kind = "fwd+bwd" if _backward else "fwd"
            register(Case(
                name=f"expm {kind} ({_batch}, {_n}, {_n}) float32", op="expm", device=_device,
                setup=_expm_setup(_batch, _n, torch.float32, _device, _backward),
                baseline_name="torch.linalg.matrix_exp",
                notes="skew-symmetric inputs, ||S||_1 ~ 1",
            ))
    for _map in ("expm", "cayley"):
        register(Case(
            name=f"OrthogonalLinear fwd+bwd N=12608 768->768 b=8 vs OFT-{_map} float32",
            op="expm", device=_device,
            setup=_oft_setup(12608, 768, 8, torch.float32, _device, _map),
            baseline_name=f"pure-PyTorch OFT ({_map} map, dense block_diag folded into W)",
            floor_name="frozen base F.linear",
        ))
