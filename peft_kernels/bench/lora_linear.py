"""lora_linear cases: fused kernel vs the HF-PEFT-style pure-PyTorch layer, with the frozen base
linear alone as the floor (LoRA cannot cost less than it)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peft_kernels import reference
from peft_kernels.bench.registry import Case, Measured, register, relative_max_error
from peft_kernels.ops import lora_linear


def _setup(n, in_f, out_f, r, dtype, device, p, backward):
    def setup() -> Measured:
        g = torch.Generator().manual_seed(0)
        bound = 1 / math.sqrt(in_f)
        x = torch.randn(n, in_f, generator=g).to(device, dtype).requires_grad_(backward)
        w = ((torch.rand(out_f, in_f, generator=g) * 2 - 1) * bound).to(device, dtype)
        b = ((torch.rand(out_f, generator=g) * 2 - 1) * bound).to(device, dtype)
        a = ((torch.rand(r, in_f, generator=g) * 2 - 1) * bound).to(device, dtype).requires_grad_(backward)
        bb = (torch.randn(out_f, r, generator=g) / math.sqrt(r)).to(device, dtype).requires_grad_(backward)
        dy = torch.randn(n, out_f, generator=g).to(device, dtype)
        scaling = 2.0

        def run(forward, inputs):
            if not backward:
                with torch.no_grad():
                    return forward()
            y = forward()
            return torch.autograd.grad(y, inputs, dy)

        kernel_fwd = lambda seed=None: lora_linear(x, w, a, bb, scaling=scaling, bias=b,
                                                   dropout_p=p, seed=seed)
        baseline_fwd = lambda: reference.lora_linear(x, w, a, bb, scaling=scaling, bias=b, dropout_p=p)

        def error() -> float:
            # Same mask on both sides: the reference replays the kernel's seed through its own
            # Philox transcription.
            seed = torch.tensor([2024], device=device)
            got = run(lambda: kernel_fwd(seed), [x, a, bb])
            d = lambda t: t.detach().double().cpu().requires_grad_(backward)
            xr, ar, br = d(x), d(a), d(bb)
            mask = reference.dropout_keep_mask(2024, n, in_f, p) if p > 0 else None
            yr = reference.lora_linear(xr, w.double().cpu(), ar, br, scaling=scaling,
                                       bias=b.double().cpu(), dropout_p=p, keep_mask=mask)
            want = torch.autograd.grad(yr, [xr, ar, br], dy.double().cpu()) if backward else yr
            return relative_max_error(got, want)

        tolerance = {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 3e-2)
        return Measured(
            kernel=lambda: run(kernel_fwd, [x, a, bb]),
            baseline=lambda: run(baseline_fwd, [x, a, bb]),
            floor=lambda: run(lambda: F.linear(x, w, b), [x]),
            error=error,
            tolerance=tolerance,
        )

    return setup


def _name(n, in_f, out_f, r, p, backward, dtype):
    kind = "fwd+bwd" if backward else "fwd"
    dt = str(dtype).replace("torch.", "")
    return f"lora_linear {kind} N={n} {in_f}->{out_f} r={r} p={p:g} {dt}"


def _register(n, in_f, out_f, r, p, backward, dtype, device, quick=True):
    register(Case(
        name=_name(n, in_f, out_f, r, p, backward, dtype), op="lora_linear", device=device,
        setup=_setup(n, in_f, out_f, r, dtype, device, p, backward),
        baseline_name="HF-PEFT-style LoRA (F.linear + B(A(dropout(x))) * s)",
        floor_name="frozen base F.linear", quick=quick,
    ))


for _p in (0.0, 0.1):
    _register(4096, 1024, 1024, 16, _p, False, torch.float32, "cpu")
    _register(4096, 1024, 1024, 16, _p, True, torch.float32, "cpu")
    _register(12608, 768, 768, 8, _p, True, torch.float32, "cpu")  # ViT-B/16, batch 64
    _register(8192, 4096, 4096, 16, _p, True, torch.bfloat16, "cuda")
    _register(8192, 4096, 11008, 64, _p, True, torch.bfloat16, "cuda")
    _register(8192, 4096, 4096, 16, _p, False, torch.bfloat16, "cuda")
