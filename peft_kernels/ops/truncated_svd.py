"""Batched truncated SVD: an exact one-sided Jacobi kernel and a randomized range finder over it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_kernels._ext import C
from peft_kernels.ops._checks import check_fake_like
from peft_kernels.ops._dispatch import cpu_half_in_float32, custom_op

METHODS = ("auto", "jacobi", "randomized", "lapack")
DEFAULT_OVERSAMPLE = 10
DEFAULT_NITER = 2
# "auto" takes an exact method for matrices this small (min(m, n)), where a sketch saves little.
AUTO_JACOBI_MAX_DIM = 64


def _lapack_svd(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The "lapack" method: torch.linalg.svd (LAPACK / cuSOLVER) cut to k, in this op's sign
    convention, a matrix with a NaN or Inf giving NaN (torch.linalg.svd raises for the batch)."""
    if not A.is_floating_point():
        raise TypeError(f"truncated_svd: A must be a floating-point tensor, got {A.dtype}")
    if A.dim() < 2:
        raise ValueError(f"truncated_svd: A must be [..., m, n] (at least 2-D), got shape "
                         f"{tuple(A.shape)}")
    if not 1 <= k <= min(A.shape[-2], A.shape[-1]):
        raise ValueError(f"truncated_svd: k must be in [1, min(m, n)] = "
                         f"[1, {min(A.shape[-2], A.shape[-1])}], got {k}")
    work = A if A.dtype in (torch.float32, torch.float64) else A.float()
    bad = ~torch.isfinite(work).all(-1).all(-1)  # no host sync
    U, S, Vh = torch.linalg.svd(work.masked_fill(bad[..., None, None], 0), full_matrices=False)
    U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    # Sign convention: the largest-magnitude entry of each column of U (the first on ties) > 0.
    pivot = U.abs().argmax(-2, keepdim=True)
    sign = torch.where(U.gather(-2, pivot) < 0, -1.0, 1.0).to(work.dtype)
    U, Vh = U * sign, Vh * sign.mT
    nan = float("nan")
    U = U.masked_fill(bad[..., None, None], nan)
    S = S.masked_fill(bad[..., None], nan)
    Vh = Vh.masked_fill(bad[..., None, None], nan)
    return U.to(A.dtype), S.to(A.dtype), Vh.to(A.dtype)


@custom_op("peft_kernels::truncated_svd")
def _truncated_svd(A: Tensor, k: int, niter: int, oversample: int,
                   method: str) -> tuple[Tensor, Tensor, Tensor]:
    if method == "lapack":
        return _lapack_svd(A, k)
    return cpu_half_in_float32(C().truncated_svd, A, k, niter, oversample, method, floating=(0,))


@_truncated_svd.register_fake
def _(A, k, niter, oversample, method):
    check_fake_like("truncated_svd", dict(A=A), "A")
    batch, m, n = A.shape[:-2], A.shape[-2], A.shape[-1]
    return (A.new_empty(*batch, m, k), A.new_empty(*batch, k), A.new_empty(*batch, k, n))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output)
    # Unused outputs' gradients stay None: zeros for U and Vh would take the full formula, which
    # divides by S_k^2 - S_j^2 and S (0 / 0 for repeated or zero singular values) where the S
    # term alone is exact.
    ctx.set_materialize_grads(False)


def _backward(ctx, gU: Optional[Tensor], gS: Optional[Tensor], gVh: Optional[Tensor]):
    """The reduced-SVD gradient (as torch.linalg.svd's, real case):

        gA = U [skew(Uᵀ gU) / E · S + S · skew(Vᵀ gV) / E + diag(gS)] Vᵀ
             + (I − U Uᵀ) gU S⁻¹ Vᵀ + U S⁻¹ gVᵀ (I − V Vᵀ),   E_jk = S_k² − S_j² (j ≠ k).

    The S term is exact for a truncated SVD too. The U and V terms are exact when the discarded
    singular values are zero (rank(A) ≤ k, or k = min(m, n)); otherwise they leave out the
    coupling to the discarded triplets, an error of order S_{k+1} / (S_k − S_{k+1}).
    """
    U, S, Vh = ctx.saved_tensors
    if gU is None and gVh is None:
        gA = None if gS is None else (U * gS.unsqueeze(-2)) @ Vh
        return gA, None, None, None, None
    gU = torch.zeros_like(U) if gU is None else gU
    gV = torch.zeros_like(Vh).mT if gVh is None else gVh.mT
    UtgU = U.mT @ gU
    VtgV = Vh @ gV
    S2 = S * S
    E = S2.unsqueeze(-2) - S2.unsqueeze(-1)
    E = E + torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)  # diagonal: skew() is 0 there
    inner = ((UtgU - UtgU.mT) / E) * S.unsqueeze(-2) + S.unsqueeze(-1) * ((VtgV - VtgV.mT) / E)
    if gS is not None:
        inner = inner + torch.diag_embed(gS)
    S_row = S.unsqueeze(-2)
    gA = U @ inner @ Vh
    gA = gA + ((gU - U @ UtgU) / S_row) @ Vh
    gA = gA + U @ ((gV - Vh.mT @ VtgV) / S_row).mT
    return gA, None, None, None, None


_truncated_svd.register_autograd(_backward, setup_context=_setup_context)


# torch.compile cannot trace torch.get_num_threads() (an int from a torch.* call: a graph break,
# an error under fullgraph=True); as a constant it is read while tracing (Dynamo's global-state
# guard includes the thread count, so a change re-traces).
@torch.compiler.assume_constant_result
def _num_threads() -> int:
    return torch.get_num_threads()


def _resolve_method(method: str, m: int, n: int, k: int, oversample: int, batch: int = 1,
                    device_type: str = "cpu", threads: Optional[int] = None) -> str:
    if method != "auto":
        return method
    p = min(m, n)
    if p > AUTO_JACOBI_MAX_DIM and 2 * (k + oversample) < p:
        return "randomized"
    if device_type != "cpu":
        # One thread block per matrix: past a few dozen columns a lone matrix's sweeps leave the
        # GPU idle, and cuSOLVER's SVD is the safer exact choice.
        return "jacobi" if p <= AUTO_JACOBI_MAX_DIM else "lapack"
    # On the CPU the Jacobi kernel wins by running matrices in parallel, which torch.linalg.svd
    # does not; one matrix on one core, LAPACK is faster (float32 / float64, 2-core Zen 5, one
    # thread: 1.28 / 1.43x LAPACK's time at 8 x 64^2, 1.56 / 1.65x at 1 x 64^2, 1.72 / 2.13x at
    # 1 x 96^2; with two threads 0.72 / 0.78x at 8 x 64^2 and 0.99 / 1.02x at 8 x 80^2).
    threads = _num_threads() if threads is None else threads
    return "jacobi" if p <= AUTO_JACOBI_MAX_DIM and min(batch, threads) >= 2 else "lapack"


def truncated_svd(A: Tensor, k: int, *, niter: Optional[int] = None,
                  oversample: Optional[int] = None,
                  method: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of every matrix of ``A [..., m, n]``.

    Returns ``U [..., m, k]``, ``S [..., k]`` (descending, non-negative) and ``Vh [..., k, n]``
    with ``A ≈ U diag(S) Vh``. Sign convention: in every column of ``U`` the entry of largest
    magnitude (the first, on ties) is positive, so results are reproducible across calls,
    methods and devices up to rounding.

    Methods:

    - ``"jacobi"``: exact. A batched one-sided Jacobi kernel (a tall matrix is first reduced to
      its square QR triangle R and Jacobi runs on Rᵀ, a wide one is transposed); at most 40
      sweeps, with a warning for a matrix that did not converge. Singular values to high relative
      accuracy. Made for batches of small matrices: on a 2-core CPU, float32, it takes 0.81× the
      time of LAPACK (``torch.linalg.svd``) at 8 × 64 × 64 and 1.5× / 2.1× / 3.5× at 128 / 256 /
      512 (one block per matrix on CUDA: hundreds of columns and beyond are slow there too).
    - ``"randomized"``: Halko–Martinsson–Tropp range finder: ``l = k + oversample`` columns
      (default ``oversample`` = 10) of ``A Ω`` for a fixed-seed Gaussian ``Ω``, ``niter``
      (default 2) subspace iterations, every product orthonormalised in-kernel, then the Jacobi
      kernel on the ``l × n`` projection. Accurate for decaying spectra; on a flat spectrum it
      returns a good rank-``k`` approximation, not the exact top singular values.
    - ``"lapack"``: exact, ``torch.linalg.svd`` (LAPACK on the CPU, cuSOLVER on CUDA) cut to
      ``k``, in this op's sign convention and NaN rule.
    - ``"auto"``: ``"randomized"`` when ``min(m, n) > 64`` and ``2 (k + oversample) < min(m, n)``
      (the sketch is much smaller than the matrix); otherwise an exact method: on CUDA
      ``"jacobi"`` when ``min(m, n) <= 64``, else ``"lapack"``; on the CPU ``"jacobi"`` when
      ``min(m, n) <= 64`` and at least two matrices can run in parallel (batch and
      ``torch.get_num_threads()`` both >= 2), else ``"lapack"`` (per core LAPACK is faster; the
      Jacobi kernel wins by running matrices side by side).

    On CUDA the float32 products around the kernels (the reduction of tall matrices, ``U = Q Z``,
    the range finder's products) follow torch's TF32 setting, as ``torch.svd_lowrank``'s do: with
    TF32 on, ``U`` and ``Vh`` are orthonormal only to TF32's precision (10 mantissa bits).

    A matrix with a NaN or Inf gives NaN for that matrix only; zero and repeated singular values
    are fine (the columns of ``U`` for zero singular values complete an orthonormal set).
    Differentiable (see ``_backward`` for when the U / V gradients are exact).
    float32, float64, float16, bfloat16 (half inputs computed in float32).
    """
    if not isinstance(A, Tensor):
        raise TypeError(f"truncated_svd: A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"truncated_svd: A must be [..., m, n] (at least 2-D), got shape "
                         f"{tuple(A.shape)}")
    if method not in METHODS:
        raise ValueError(f"truncated_svd: method must be one of {METHODS}, got {method!r}")
    for name, value, optional in (("k", k, False), ("niter", niter, True),
                                  ("oversample", oversample, True)):
        if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"truncated_svd: {name} must be an int, got {type(value).__name__}")
    m, n = A.shape[-2], A.shape[-1]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"truncated_svd: k must be in [1, min(m, n)] = [1, {min(m, n)}] for A "
                         f"of shape {tuple(A.shape)}, got {k}")
    niter = DEFAULT_NITER if niter is None else niter
    oversample = DEFAULT_OVERSAMPLE if oversample is None else oversample
    if niter < 0:
        raise ValueError(f"truncated_svd: niter must be >= 0, got {niter}")
    if oversample < 0:
        raise ValueError(f"truncated_svd: oversample must be >= 0, got {oversample}")
    batch = A.numel() // max(1, m * n)
    return _truncated_svd(A, k, niter, oversample,
                          _resolve_method(method, m, n, k, oversample, batch, A.device.type))
