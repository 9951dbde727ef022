"""truncated_svd cases: the batched kernel vs torch.linalg.svd (full, then truncated) and vs
torch.svd_lowrank(q = k + oversample, niter = 2), with each side's accuracy reported.

Inputs have the power-law spectrum s_i = 1 / i of Haar-random singular vectors, the slow decay of
pretrained weight matrices that PiSSA and SVD-node methods decompose. Accuracy is the largest
error of the top-k singular values relative to the largest, against that constructed spectrum
(the float64 product U diag(s) Vᵀ has it to 1.3e-15, checked against LAPACK's svdvals at
(36, 768, 768), which would take 3.7 s per case here)."""
from __future__ import annotations

import torch

from peft_kernels.bench.registry import Case, Measured, register
from peft_kernels.ops import truncated_svd
from peft_kernels.ops.truncated_svd import DEFAULT_OVERSAMPLE

LOWRANK_NITER = 2


def power_law_spectrum(p: int) -> torch.Tensor:
    return 1.0 / torch.arange(1, p + 1, dtype=torch.float64)


def power_law_matrices(batch, m, n, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(batch, m, p, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, n, p, generator=g, dtype=torch.float64))
    return (U * power_law_spectrum(p)) @ V.mT


def _values_error(S: torch.Tensor, S_ref: torch.Tensor) -> float:
    return ((S.double().cpu() - S_ref).abs() / S_ref[..., :1]).max().item()


def _setup(batch, m, n, k, baseline, dtype, device):
    def setup() -> Measured:
        A64 = power_law_matrices(batch, m, n)
        A = A64.to(device, dtype)
        S_ref = power_law_spectrum(min(m, n))[:k].expand(batch, k)
        kernel = lambda: truncated_svd(A, k)
        if baseline == "svd":
            base = lambda: torch.linalg.svd(A, full_matrices=False)[1][..., :k]
        else:
            base = lambda: torch.svd_lowrank(A, q=k + DEFAULT_OVERSAMPLE, niter=LOWRANK_NITER)[1][..., :k]
        return Measured(
            kernel=kernel, baseline=base,
            error=lambda: _values_error(kernel()[1], S_ref),
            baseline_error=lambda: _values_error(base(), S_ref),
            tolerance={torch.float32: 1e-3, torch.float64: 1e-3}[dtype],
        )

    return setup


def _register(batch, m, n, k, device, dtype=torch.float32, quick_svd=True):
    for baseline, name in (("svd", "torch.linalg.svd (full, then top k)"),
                           ("lowrank", f"torch.svd_lowrank(q=k+{DEFAULT_OVERSAMPLE}, niter={LOWRANK_NITER})")):
        register(Case(
            name=f"truncated_svd ({batch}, {m}, {n}) k={k} {str(dtype).replace('torch.', '')} "
                 f"vs {'svd' if baseline == 'svd' else 'svd_lowrank'}",
            op="truncated_svd", device=device, setup=_setup(batch, m, n, k, baseline, dtype, device),
            baseline_name=name, quick=quick_svd or baseline != "svd",
        ))


# torch.linalg.svd takes about 20 s at (36, 768, 768) on 2 CPU cores: those cases run with --all.
_register(36, 768, 768, 10, "cpu", quick_svd=False)
_register(12, 1024, 1024, 32, "cpu", quick_svd=False)
_register(8, 64, 64, 64, "cpu")
_register(36, 768, 768, 10, "cuda")
_register(12, 1024, 1024, 32, "cuda")
_register(8, 64, 64, 64, "cuda")
# PiSSA initialisation of LLaMA-7B: 32 layers x (4 attention 4096 x 4096 + 3 MLP 11008 x 4096).
_register(128, 4096, 4096, 16, "cuda", quick_svd=False)
_register(96, 11008, 4096, 16, "cuda", quick_svd=False)
