"""sparse_delta_linear cases: the masked-gradient backward against the pure-PyTorch ways sparse
fine-tuning computes the gradient of k selected weights:
  (a) dense:  the dense ``dyᵀ x`` weight gradient and a mask hook (SIFT-style, also what a dense
              Δ parameter with a masking hook costs),
  (b) SPT:    ``diag(dy[:, rows]ᵀ x[:, cols])`` (O(k²·N) work and k² memory; only where k ≤ 2048),
  (c) gather: ``(dy[:, rows] * x[:, cols]).sum(0)`` (two N×k temporaries; only where N·k ≤ 2²⁶).
"weight-gradient" cases time that part alone; "backward" cases the whole backward with dx, whose
``dy W`` GEMM both sides share (so 2× is the ceiling there). The notes give the trainable state:
k values plus Adam's two moments, against out·in of each for a dense Δ.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peft_kernels.bench.registry import Case, Measured, register, relative_max_error
from peft_kernels.ops.sparse_delta_linear import _sparse_delta_linear_bwd, sparse_delta_linear

SPT_MAX_K = 2048
GATHER_MAX_ELEMENTS = 1 << 26


def _inputs(n_tokens, out_f, in_f, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_f)
    w = ((torch.rand(out_f, in_f, generator=g) * 2 - 1) * bound).to(device, dtype)
    idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(device)
    v = (torch.randn(k, generator=g) * bound).to(device, dtype)
    x = torch.randn(n_tokens, in_f, generator=g).to(device, dtype)
    dy = torch.randn(n_tokens, out_f, generator=g).to(device, dtype)
    return x, w, idx, v, dy


def _grad_setup(n_tokens, out_f, in_f, k, dtype, device, baseline):
    def setup() -> Measured:
        x, w, idx, v, dy = _inputs(n_tokens, out_f, in_f, k, dtype, device)
        mask = torch.zeros(out_f * in_f, dtype=torch.bool, device=device)
        mask[idx] = True
        mask = mask.view(out_f, in_f)
        rows, cols = idx // in_f, idx % in_f

        def kernel():
            return _sparse_delta_linear_bwd(dy, x, w, idx, v, False, True, False)[1]

        baselines = {
            "dense": lambda: (dy.t() @ x) * mask,
            "spt": lambda: torch.diag(dy[:, rows].t() @ x[:, cols]),
            "gather": lambda: (dy[:, rows] * x[:, cols]).sum(0),
        }

        def error() -> float:
            want = (dy.double().t() @ x.double()).view(-1)[idx].cpu()
            return relative_max_error(kernel(), want)

        return Measured(kernel=kernel, baseline=baselines[baseline], error=error,
                        tolerance={torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype])

    return setup


def _backward_setup(n_tokens, out_f, in_f, k, dtype, device):
    def setup() -> Measured:
        x, w, idx, v, dy = _inputs(n_tokens, out_f, in_f, k, dtype, device)
        x.requires_grad_()
        v.requires_grad_()
        y = sparse_delta_linear(x, w, idx, v)
        mask = torch.zeros(out_f * in_f, dtype=dtype, device=device)
        mask[idx] = 1
        mask = mask.view(out_f, in_f)
        delta = torch.zeros(out_f * in_f, dtype=dtype, device=device)
        delta[idx] = v.detach()
        delta = delta.view(out_f, in_f).requires_grad_()
        delta.register_hook(lambda g: g * mask)
        y_dense = F.linear(x, w + delta)

        def kernel():
            return torch.autograd.grad(y, [x, v], dy, retain_graph=True)

        def baseline():
            return torch.autograd.grad(y_dense, [x, delta], dy, retain_graph=True)

        def error() -> float:
            got = kernel()
            x64, dy64 = x.detach().double().cpu(), dy.double().cpu()
            w_eff = w.double().cpu() + delta.detach().double().cpu()
            want = (dy64 @ w_eff, (dy64.t() @ x64).view(-1)[idx.cpu()])
            return relative_max_error(got, want)

        return Measured(kernel=kernel, baseline=baseline, error=error,
                        tolerance={torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype])

    return setup


def _state_note(out_f, in_f, k, dtype):
    item = torch.finfo(dtype).bits // 8
    return (f"trainable state (values + Adam moments): {3 * k * item} B vs dense Δ "
            f"{3 * out_f * in_f * item} B")


def _register(device, dtype, n_tokens, out_f, in_f, k, label, quick_all=True):
    tname = str(dtype).replace("torch.", "")
    shape = f"N={n_tokens} {out_f}x{in_f} k={k} ({label})"
    note = _state_note(out_f, in_f, k, dtype)
    names = {"dense": "dense dyᵀx + mask (a)", "spt": "SPT diag(dy[:,rows]ᵀ x[:,cols]) (b)",
             "gather": "gather SDDMM (dy[:,rows]*x[:,cols]).sum(0) (c)"}
    for baseline in ("dense", "spt", "gather"):
        if baseline == "spt" and k > SPT_MAX_K:
            continue
        if baseline == "gather" and n_tokens * k > GATHER_MAX_ELEMENTS:
            continue
        register(Case(
            name=f"sparse weight-gradient {shape} vs {baseline} {tname}", op="sparse_delta_linear",
            device=device, setup=_grad_setup(n_tokens, out_f, in_f, k, dtype, device, baseline),
            baseline_name=names[baseline], quick=quick_all or baseline == "dense", notes=note,
        ))
    register(Case(
        name=f"sparse backward {shape} vs dense {tname}", op="sparse_delta_linear", device=device,
        setup=_backward_setup(n_tokens, out_f, in_f, k, dtype, device),
        baseline_name="dense Δ parameter with a mask hook (a)", notes=note,
    ))


for _density, _label in ((0.001, "0.1%"), (0.01, "1%"), (0.05, "5%")):
    _register("cpu", torch.float32, 4096, 1024, 1024, round(_density * 1024 * 1024), _label,
              quick_all=False)
_register("cpu", torch.float32, 12608, 768, 768, 1200, "ViT-B")
for _out, _in in ((4096, 4096), (11008, 4096)):
    for _density, _label in ((0.001, "0.1%"), (0.01, "1%")):
        _register("cuda", torch.bfloat16, 8192, _out, _in, round(_density * _out * _in), _label,
                  quick_all=False)
