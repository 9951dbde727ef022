"""pk.ops.truncated_svd against numpy's LAPACK SVD (float64): exact accuracy (the Jacobi kernel, and
the "lapack" method's conventions) over shapes and hard spectra, randomized accuracy on decaying
spectra, the kernels on their own, gradients, NaN isolation, opcheck, compile and bad inputs."""
import contextlib
import math

import numpy as np
import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference
from peft_kernels._ext import C
from peft_kernels.ops.truncated_svd import _resolve_method
from tolerances import SVD_TOLERANCES, TOLERANCES

DTYPES = [torch.float64, torch.float32]
EXACT = ["jacobi", "lapack"]


def with_spectrum(m: int, n: int, s, seed: int = 0, batch=()) -> torch.Tensor:
    """float64 U diag(s) Vᵀ with Haar-random U, V."""
    g = torch.Generator().manual_seed(seed)
    p = len(s)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, p, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, p, generator=g, dtype=torch.float64))
    return (U * torch.as_tensor(s, dtype=torch.float64)) @ V.mT


def random_matrix(shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def svd_tolerance(dtype) -> dict:
    if dtype in SVD_TOLERANCES:
        return SVD_TOLERANCES[dtype]
    # float16 / bfloat16, computed in float32: the input and the outputs are rounded to the half
    # type once each, which the one table's half bounds cover (O(1) values: S / S_max, U, V).
    half = TOLERANCES[dtype]
    return dict(values=half["rtol"], orthonormal=half["atol"], residual=half["atol"])


def check_svd(A: torch.Tensor, U, S, Vh, k: int, dtype, values=True):
    """S against LAPACK, U and V orthonormal, A V = U S, relative to S_max."""
    tol = svd_tolerance(dtype)
    A64 = A.detach().double().cpu()
    _, S_ref, _ = reference.truncated_svd(A64, k)
    U, S, Vh = U.double().cpu(), S.double().cpu(), Vh.double().cpu()
    assert U.shape == A.shape[:-1] + (k,) and S.shape == A.shape[:-2] + (k,)
    assert Vh.shape == A.shape[:-2] + (k, A.shape[-1])
    scale = S_ref.amax(-1, keepdim=True).clamp_min(1e-300)
    if values:
        assert ((S - S_ref).abs() / scale).max() <= tol["values"]
    assert (S[..., 1:] <= S[..., :-1]).all() and (S >= 0).all()
    eye = torch.eye(k, dtype=torch.float64)
    assert (U.mT @ U - eye).abs().max() <= tol["orthonormal"]
    assert (Vh @ Vh.mT - eye).abs().max() <= tol["orthonormal"]
    residual = A64 @ Vh.mT - U * S.unsqueeze(-2)
    assert (residual.abs().amax((-2, -1)) / scale.squeeze(-1)).max() <= tol["residual"]


# ------------------------------------------------------------------------------------ jacobi


# 130 x 100 and 260 x 257: Jacobi on R^T with n = 100 and 257 columns (on CUDA past auto's 64,
# each warp rotating 6-7 and 16-17 pairs of a round, 257 odd: one column sits each round out).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((5, 5), 5), ((40, 30), 30), ((40, 30), 7), ((30, 50), 12),
                                     ((64, 64), 64), ((1, 7), 1), ((7, 1), 1), ((3, 4, 20, 12), 5),
                                     ((2, 97, 33), 33), ((33, 65), 33), ((130, 100), 100),
                                     ((260, 257), 20)])
@pytest.mark.parametrize("method", EXACT)
def test_exact_matches_numpy(device, dtype, shape, k, method):
    A = random_matrix(shape, seed=sum(shape) + k)
    U, S, Vh = pk.ops.truncated_svd(A.to(device, dtype), k, method=method)
    assert U.dtype == S.dtype == Vh.dtype == dtype and U.device.type == device
    check_svd(A.to(dtype), U, S, Vh, k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", EXACT)
def test_exact_vectors_follow_the_sign_convention(device, dtype, method):
    # Well-separated spectrum: the vectors are unique up to sign, and the convention fixes it.
    A = with_spectrum(30, 20, [2.0 ** -i for i in range(20)], seed=3)
    U, S, Vh = pk.ops.truncated_svd(A.to(device, dtype), 6, method=method)
    U_ref, _, Vh_ref = reference.truncated_svd(A, 6)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (U.double().cpu() - U_ref).abs().max() <= tol
    assert (Vh.double().cpu() - Vh_ref).abs().max() <= tol


HARD = {
    "zero": lambda: torch.zeros(12, 9, dtype=torch.float64),
    "rank1": lambda: with_spectrum(12, 9, [3.0]),
    "repeated": lambda: with_spectrum(12, 9, [2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]),
    "clustered": lambda: with_spectrum(12, 9, [1.0 + 1e-9 * i for i in range(9)]),
    "graded": lambda: with_spectrum(12, 9, [10.0 ** -i for i in range(9)]),
    "rank_deficient": lambda: with_spectrum(12, 9, [5.0, 4.0, 3.0]),
    "tiny": lambda: 1e-200 * random_matrix((12, 9)),
    "huge": lambda: 1e200 * random_matrix((12, 9)),
    # float32 scales that the op brings to max |a| = 1 (outside [1e-6, 1e6]) and back
    "small": lambda: 1e-9 * random_matrix((12, 9)),
    "large": lambda: 1e9 * random_matrix((12, 9)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(HARD))
@pytest.mark.parametrize("k", [3, 9])
@pytest.mark.parametrize("method", EXACT)
def test_exact_hard_spectra(device, dtype, kind, k, method):
    if dtype == torch.float32 and kind in ("tiny", "huge"):
        pytest.skip("outside float32's range")
    A = HARD[kind]().to(dtype)
    U, S, Vh = pk.ops.truncated_svd(A.to(device), k, method=method)
    check_svd(A, U, S, Vh, k, dtype)
    if kind == "zero":
        assert (S == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_jacobi_columns_already_orthogonal(device, dtype, batch):
    # Pairs that need no rotation in the first round of a sweep: the kernel's column norms come
    # from that round, so they must be kept whether or not the pair rotates (once they were only
    # kept for rotated pairs, and such columns were taken for zero). Half the columns mutually
    # orthogonal with graded norms, half random; and a matrix that is orthogonal throughout.
    Q = torch.linalg.qr(random_matrix((batch, 24, 16), seed=3))[0]
    mixed = torch.cat([Q[..., :8] * torch.logspace(0, -3, 8, dtype=torch.float64),
                       random_matrix((batch, 24, 8), seed=4)], dim=-1)
    orthogonal = Q * torch.logspace(0, -2, 16, dtype=torch.float64)
    for A in (mixed.to(dtype), orthogonal.to(dtype)):
        U, S, Vh = pk.ops.truncated_svd(A.to(device), 16, method="jacobi")
        check_svd(A, U, S, Vh, 16, dtype)
    _, _, sweeps = C().svd_jacobi_columns(orthogonal.mT.contiguous().to(device, dtype))
    assert (sweeps.cpu() == 1).all()  # nothing to rotate: one sweep finds it converged


def test_jacobi_graded_small_values_relative(device):
    # Column scaling A = B D with B well conditioned: one-sided Jacobi keeps every singular value
    # to high relative accuracy, the small ones included.
    B = with_spectrum(20, 8, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], seed=5)
    A = B * torch.tensor([10.0 ** -i for i in range(8)], dtype=torch.float64)
    _, S, _ = pk.ops.truncated_svd(A.to(device), 8, method="jacobi")
    S_ref = torch.from_numpy(np.linalg.svd(A.numpy(), compute_uv=False))
    assert ((S.cpu() - S_ref).abs() / S_ref).max() <= 1e-12


def test_jacobi_mixed_batch_and_noncontiguous(device):
    parts = [HARD["zero"](), HARD["rank1"](), HARD["graded"](), random_matrix((12, 9), seed=9)]
    A = torch.stack(parts).to(device)
    U, S, Vh = pk.ops.truncated_svd(A, 4, method="jacobi")
    check_svd(A, U, S, Vh, 4, torch.float64)
    At = torch.stack(parts).mT.contiguous().mT.to(device)  # same values, column-major strides
    assert not At.is_contiguous()
    U2, S2, Vh2 = pk.ops.truncated_svd(At, 4, method="jacobi")
    torch.testing.assert_close(S2, S, rtol=0, atol=1e-13)


def test_result_does_not_depend_on_the_batch(device):
    # One matrix alone (a round's pairs split over threads) and in a batch (one matrix per
    # thread) run the same rotations in the same order: bitwise equal.
    A = random_matrix((6, 48, 40), seed=11).to(device)
    U, S, Vh = pk.ops.truncated_svd(A, 10, method="jacobi")
    U1, S1, Vh1 = pk.ops.truncated_svd(A[2:3], 10, method="jacobi")
    if device == "cuda":  # torch's CUDA QR: cuBLAS batched for 6 matrices, cuSOLVER for one
        for one, batched in ((S1[0], S[2]), (U1[0], U[2]), (Vh1[0], Vh[2])):
            torch.testing.assert_close(one, batched, rtol=0, atol=1e-12)
    else:
        assert torch.equal(S1[0], S[2]) and torch.equal(U1[0], U[2]) and torch.equal(Vh1[0], Vh[2])


@pytest.mark.parametrize("shape", [(2, 1, 1), (3, 5, 5), (2, 1, 4), (2, 6, 3)])
@pytest.mark.parametrize("method", ["jacobi", "randomized", "lapack"])
def test_input_is_never_modified(device, shape, method):
    A = random_matrix(shape, seed=4).to(device)
    A[0].view(-1)[0] = float("inf")  # the kernels fill a non-finite matrix with NaN
    before = A.clone()
    k = min(shape[-2:])
    U, S, Vh = pk.ops.truncated_svd(A, k, method=method)
    assert torch.equal(A, before)
    assert torch.isnan(S[0]).all() and torch.isfinite(S[1:]).all()


def test_nan_isolated_to_its_matrix(device):
    A = random_matrix((3, 10, 8), seed=2)
    A[1, 2, 3] = float("nan")
    A[2, 0, 0] = float("inf")
    A = A.to(device)
    for method in ("jacobi", "randomized", "lapack"):
        U, S, Vh = pk.ops.truncated_svd(A, 4, method=method, oversample=2)
        assert torch.isnan(S[1]).all() and torch.isnan(U[1]).all() and torch.isnan(Vh[1]).all()
        assert torch.isnan(S[2]).all()
        assert torch.isfinite(S[0]).all() and torch.isfinite(U[0]).all()


@pytest.mark.parametrize("method", ["auto", "lapack"])
def test_empty_batch(device, method):
    U, S, Vh = pk.ops.truncated_svd(torch.zeros(0, 6, 5, device=device), 2, method=method)
    assert U.shape == (0, 6, 2) and S.shape == (0, 2) and Vh.shape == (0, 2, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["lapack", "jacobi", "randomized"])
def test_half_inputs_in_float32(device, dtype, method):
    # The kernels take float32 / float64 only: half inputs are computed in float32 (on CUDA by
    # the C++ op, on the CPU by the Python wrapper). The sketch (9 of 9 columns) spans the whole
    # range, so "randomized" is exact here too.
    A = random_matrix((2, 12, 9), seed=6).to(device, dtype)
    U, S, Vh = pk.ops.truncated_svd(A, 4, method=method)
    U32, S32, Vh32 = pk.ops.truncated_svd(A.float(), 4, method=method)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    for half, full in ((U, U32), (S, S32), (Vh, Vh32)):
        assert torch.equal(half, full.to(dtype))
    check_svd(A, U, S, Vh, 4, dtype)


# -------------------------------------------------------------------------------- randomized


def decaying(m, n, batch=(), rate=0.7, seed=0):
    return with_spectrum(m, n, [rate ** i for i in range(min(m, n))], seed=seed, batch=batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((200, 150), 10), ((150, 260), 8), ((3, 300, 300), 16)])
def test_randomized_decaying_spectrum(device, dtype, shape, k):
    # Defaults (oversample 10, niter 2): top-k values within 1e-3 relative and the rank-k
    # reconstruction within 1% of the optimum (Eckart-Young), the specification.
    A = decaying(shape[-2], shape[-1], batch=shape[:-2], seed=k)
    U, S, Vh = pk.ops.truncated_svd(A.to(device, dtype), k, method="randomized")
    s_all = torch.linalg.svdvals(A)
    assert ((S.double().cpu() - s_all[..., :k]).abs() / s_all[..., :k]).max() <= 1e-3
    err = torch.linalg.matrix_norm(A - (U.double().cpu() * S.double().cpu().unsqueeze(-2)) @ Vh.double().cpu())
    optimal = s_all[..., k:].square().sum(-1).sqrt()
    assert (err / optimal).max() <= 1.01
    eye = torch.eye(k, dtype=torch.float64)
    orth_tol = SVD_TOLERANCES[dtype]["orthonormal"]
    assert (U.double().cpu().mT @ U.double().cpu() - eye).abs().max() <= orth_tol
    assert (Vh.double().cpu() @ Vh.double().cpu().mT - eye).abs().max() <= orth_tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k,rank", [((40, 36), 4, 3), ((300, 200), 8, 5), ((150, 320), 8, 5)])
def test_randomized_rank_deficient(device, dtype, shape, k, rank):
    # rank < l = k + oversample: the sketch spans the whole range, so the result is exact (the
    # zero singular values' vectors included), and from the (rank + 1)-th column on the range
    # finder's vectors are dependent: each is replaced by the standard basis vector least
    # represented in the ones before it, over the m = 40 (> 32: several warps' candidates) and
    # m = 300, 320 (> 256: several rows per thread) rows of C Omega.
    A = with_spectrum(*shape, [float(rank - i) for i in range(rank)], seed=rank)
    U, S, Vh = pk.ops.truncated_svd(A.to(device, dtype), k, method="randomized")
    check_svd(A.to(dtype), U, S, Vh, k, dtype)


def test_randomized_flat_spectrum_bound(device):
    # A flat spectrum (Gaussian matrix) is the sketch's worst case: the top values are not
    # resolved, but the rank-k approximation stays within 10% of the optimal error (measured
    # 1.02-1.03 at these shapes with the defaults).
    A = random_matrix((4, 300, 200), seed=4)
    U, S, Vh = pk.ops.truncated_svd(A.to(device), 10, method="randomized")
    s_all = torch.linalg.svdvals(A)
    err = torch.linalg.matrix_norm(A - (U.cpu() * S.cpu().unsqueeze(-2)) @ Vh.cpu())
    assert (err / s_all[..., 10:].square().sum(-1).sqrt()).max() <= 1.10


def test_randomized_is_deterministic_and_batch_independent(device):
    A = decaying(120, 90, batch=(3,), seed=8).to(device)
    U, S, Vh = pk.ops.truncated_svd(A, 5, method="randomized")
    U1, S1, Vh1 = pk.ops.truncated_svd(A[1:2], 5, method="randomized")
    torch.testing.assert_close(S1[0], S[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(U1[0], U[1], rtol=0, atol=1e-12)
    U2, S2, Vh2 = pk.ops.truncated_svd(A, 5, method="randomized")
    assert torch.equal(S2, S) and torch.equal(U2, U)


@pytest.mark.parametrize("wide", [False, True])
def test_randomized_in_chunks_matches_one_matrix_at_a_time(wide):
    # 3.4 MB float64 matrices: the CPU runs a batch of six in chunks of at most 16 MiB (see
    # randomized_chunk), scaling each chunk's matrices on their own; the extreme one sits in the
    # last chunk.
    A = decaying(700, 600, batch=(6,), seed=9)
    A[5] *= 1e20
    if wide:
        A = A.mT
    U, S, Vh = pk.ops.truncated_svd(A, 5, method="randomized")
    for i in range(6):
        U1, S1, Vh1 = pk.ops.truncated_svd(A[i:i + 1], 5, method="randomized")
        torch.testing.assert_close(S1[0], S[i], rtol=1e-12, atol=0)
        torch.testing.assert_close(U1[0], U[i], rtol=0, atol=1e-12)
        torch.testing.assert_close(Vh1[0], Vh[i], rtol=0, atol=1e-12)
    s_all = torch.linalg.svdvals(A)[..., :5]
    assert ((S - s_all).abs() / s_all).max() <= 1e-3


def test_auto_rules():
    cpu = dict(device_type="cpu", threads=2)
    assert _resolve_method("auto", 64, 64, 64, 10, 8, **cpu) == "jacobi"
    assert _resolve_method("auto", 768, 768, 10, 10, 8, **cpu) == "randomized"
    assert _resolve_method("auto", 4096, 11008, 16, 10, 1, **cpu) == "randomized"
    assert _resolve_method("auto", 200, 100, 40, 10, 8, **cpu) == "lapack"  # sketch of 50 of 100
    assert _resolve_method("auto", 200, 100, 40, 10, 8, device_type="cuda") == "lapack"
    assert _resolve_method("auto", 200, 64, 40, 10, 8, device_type="cuda") == "jacobi"
    # The CPU Jacobi kernel only pays when matrices run side by side.
    assert _resolve_method("auto", 64, 64, 64, 10, 1, **cpu) == "lapack"
    assert _resolve_method("auto", 64, 64, 64, 10, 8, device_type="cpu", threads=1) == "lapack"
    assert _resolve_method("auto", 64, 64, 64, 10, 1, device_type="cuda") == "jacobi"
    assert _resolve_method("jacobi", 768, 768, 10, 10, 1, **cpu) == "jacobi"
    assert _resolve_method("lapack", 8, 8, 2, 10, 8, **cpu) == "lapack"


@pytest.mark.parametrize("batch,method", [((1,), "lapack"), ((4,), "jacobi")])
def test_auto_takes_its_rule(monkeypatch, batch, method):
    import sys

    module = sys.modules["peft_kernels.ops.truncated_svd"]  # the package re-exports the function
    if torch.get_num_threads() < 2 and method == "jacobi":
        pytest.skip("one CPU thread: auto takes LAPACK for every exact case")
    taken = []
    real = module._truncated_svd
    monkeypatch.setattr(module, "_truncated_svd", lambda A, k, niter, oversample, m: (
        taken.append(m) or real(A, k, niter, oversample, m)))
    pk.ops.truncated_svd(random_matrix((*batch, 20, 16)), 4)
    assert taken == [method]


# ----------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("dtype", DTYPES)
# m = 40 and 300: the replacement row's search spans several warps (m > 32) and, on CUDA, several
# rows per thread (m > 256, the least represented one in a thread's second row).
@pytest.mark.parametrize("m,free", [(30, 17), (40, 37), (300, 270)])
def test_orthonormalize_kernel(device, dtype, m, free):
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(5, 6, m, generator=g, dtype=torch.float64)
    Q[1, 3] = Q[1, 0] * 2 - Q[1, 1]  # dependent on the rows before it
    Q[2, 0] = 0.0  # zero
    Q[3, 2] = Q[3, 1]  # repeated
    # Row 0 touches every coordinate but `free`, row 1 repeats it: the least represented basis
    # vector is e_free (every other one holds 1 / (m - 1) of row 0), which replaces row 1 as is.
    Q[4, 0] = 1.0
    Q[4, 0, free] = 0.0
    Q[4, 1] = Q[4, 0]
    out = C().svd_orthonormalize_rows(Q.to(device, dtype)).double().cpu()
    tol = SVD_TOLERANCES[dtype]["orthonormal"]
    assert (out @ out.mT - torch.eye(6, dtype=torch.float64)).abs().max() <= tol
    represented = out[4, :1].square().sum(0)
    assert int(represented.argmin()) == free
    assert (out[4, 1] - torch.eye(m, dtype=torch.float64)[free]).abs().max() <= tol
    # Row j of an independent input lies in the span of input rows 0..j (Gram-Schmidt order).
    for j in range(6):
        basis = Q[0, : j + 1]
        P = basis.mT @ torch.linalg.pinv(basis.mT)
        assert (P @ out[0, j] - out[0, j]).abs().max() <= 10 * tol


def test_orthonormalize_kernel_full_and_nan(device):
    Q = torch.zeros(2, 5, 5, dtype=torch.float64)  # all dependent: completed to a basis
    Q[1, 0, 0] = float("nan")
    out = C().svd_orthonormalize_rows(Q.to(device)).cpu()
    assert (out[0] @ out[0].mT - torch.eye(5, dtype=torch.float64)).abs().max() <= 1e-12
    assert torch.isnan(out[1, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_split_over_threads_matches_the_batch(dtype):
    # 257 columns: alone, a matrix's rounds (129 pairs, the odd column sitting each one out in
    # turn) are split over the threads, each keeping its own pairs' column norms; in a batch of
    # two, each thread sweeps a whole matrix. The same rotations either way: bitwise equal (the
    # kernel itself; the op's BLAS products may round differently for a batch of one).
    X = random_matrix((2, 257, 260), seed=12).to(dtype)
    out, V, sweeps = C().svd_jacobi_columns(X)
    out1, V1, sweeps1 = C().svd_jacobi_columns(X[1:])
    assert sweeps1[0] == sweeps[1] and 2 <= sweeps[1] <= 20
    assert torch.equal(out1[0], out[1]) and torch.equal(V1[0], V[1])
    if dtype == torch.float64:  # float32's column norms are only final after the op's refinement
        S = out.norm(dim=-1).sort(dim=-1, descending=True).values
        S_ref = torch.linalg.svdvals(X)
        assert ((S - S_ref).abs() / S_ref[..., :1]).max() <= SVD_TOLERANCES[dtype]["values"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_jacobi_kernel_sweeps_and_status(device, dtype):
    X = random_matrix((3, 16, 40), seed=1)
    X[2, 0, 0] = float("nan")
    out, V, sweeps = C().svd_jacobi_columns(X.to(device, dtype))
    sweeps = sweeps.cpu()
    assert 2 <= sweeps[0] <= 15 and 2 <= sweeps[1] <= 15
    assert sweeps[2] == -2  # svd::kNonFinite
    out, V = out.double().cpu(), V.double().cpu()
    # out = A V with V orthogonal (rows of V are its columns), out's rows mutually orthogonal.
    torch.testing.assert_close(out[:2], V[:2] @ X[:2], rtol=0, atol=SVD_TOLERANCES[dtype]["residual"] * 10)
    gram = out[:2] @ out[:2].mT
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    assert off.abs().max() <= SVD_TOLERANCES[dtype]["orthonormal"] * gram.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_columns_converge(device, dtype, recwarn):
    """Jacobi on R^T of a matrix with a repeated column drives one of R's rows towards zero
    without reaching it; before such columns were set to zero (eps^2 |A|), 18 of these 200
    float32 matrices ran into the 40-sweep bound."""
    A = random_matrix((200, 17, 8), seed=0).to(dtype)
    A[..., 1] = A[..., 0]
    Q, R = torch.linalg.qr(A)
    _, _, sweeps = C().svd_jacobi_columns(R.contiguous().to(device))
    assert int(sweeps.min()) >= 1 and int(sweeps.max()) <= 12
    U, S, Vh = pk.ops.truncated_svd(A.to(device), 8, method="jacobi")
    assert not [w for w in recwarn if "did not converge" in str(w.message)]
    check_svd(A, U, S, Vh, 8, dtype)  # the zero singular value included


# ------------------------------------------------------------------------------ gradients


def _loss_parts(A, k, method="jacobi"):
    U, S, Vh = pk.ops.truncated_svd(A, k, method=method)
    return U, S, Vh


@pytest.mark.parametrize("shape,k", [((6, 4), 4), ((4, 6), 4), ((2, 5, 5), 5)])
@pytest.mark.parametrize("method", EXACT)
def test_gradcheck_full_rank(shape, k, method):
    # k = min(m, n): the reduced-SVD gradient is exact; spectrum well separated.
    A = with_spectrum(shape[-2], shape[-1], [4.0, 3.0, 2.0, 1.0, 0.5][:min(shape[-2:])],
                      seed=1, batch=shape[:-2]).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: _loss_parts(a, k, method), (A,), atol=1e-7,
                                    rtol=1e-5)


def test_gradcheck_truncated_rank_k():
    # rank(A) = k < min(m, n): the complement-projector terms are exact there too.
    A = with_spectrum(7, 5, [3.0, 2.0, 1.0], seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: _loss_parts(a, 3), (A,), atol=1e-6, rtol=1e-4)


def test_singular_value_gradient_exact_when_truncated():
    A = random_matrix((9, 7), seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: _loss_parts(a, 3)[1], (A,), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("registered", [False, True])
def test_singular_value_gradient_with_repeated_and_zero_values(registered):
    # S alone (a nuclear-norm penalty): U_k V_kᵀ, finite where the U / V terms would divide by
    # S_j^2 - S_k^2 = 0 and by S = 0. (U, S, Vh unused outputs get no zero-filled gradient.)
    W = torch.diag(torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    for k in (3, 5):
        A = W.clone().requires_grad_()
        with torch.device("cpu") if registered else contextlib.nullcontext():
            _, S, _ = pk.ops.truncated_svd(A, k, method="jacobi")
            S.sum().backward()
        want = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0][:k] + [0.0] * (5 - k),
                                       dtype=torch.float64))
        if k == 5:  # the two zero singular values' vectors carry +-1 each: U Vᵀ is orthogonal
            assert torch.isfinite(A.grad).all()
            torch.testing.assert_close(A.grad[:3, :3], want[:3, :3], rtol=0, atol=1e-14)
        else:
            torch.testing.assert_close(A.grad, want, rtol=0, atol=1e-14)


def test_gradient_matches_torch_linalg_svd():
    A = with_spectrum(8, 6, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5], seed=3).requires_grad_()
    A2 = A.detach().clone().requires_grad_()
    U, S, Vh = pk.ops.truncated_svd(A, 6, method="jacobi")
    U2, S2, Vh2 = torch.linalg.svd(A2, full_matrices=False)
    sign = torch.sign((U * U2).sum(0)).detach()  # align torch's signs to ours
    g = torch.Generator().manual_seed(0)
    wU, wS, wV = (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64),
                  torch.randn(6, 6, generator=g, dtype=torch.float64))
    ((U * wU).sum() + (S * wS).sum() + (Vh * wV).sum()).backward()
    ((U2 * sign * wU).sum() + (S2 * wS).sum() + (Vh2 * sign.unsqueeze(-1) * wV).sum()).backward()
    torch.testing.assert_close(A.grad, A2.grad, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------- registration, compile


def test_opcheck():
    A = random_matrix((2, 9, 7), seed=3)
    op = torch.ops.peft_kernels.truncated_svd.default
    torch.library.opcheck(op, (A, 3, 2, 4, "jacobi"))
    torch.library.opcheck(op, (A, 3, 2, 4, "lapack"))
    torch.library.opcheck(op, (A.float(), 3, 2, 2, "randomized"),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    A = random_matrix((2, 9, 7), seed=4)

    def rank3(a):
        U, S, Vh = pk.ops.truncated_svd(a, 3, method="jacobi")
        return (U * S.unsqueeze(-2)) @ Vh

    compiled = torch.compile(rank3, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(A), rank3(A))


@pytest.mark.parametrize("batch", [(), (4,)])
def test_compile_fullgraph_auto_on_cpu(batch):
    # "auto" on the CPU reads torch.get_num_threads() for an exact case: that int must not
    # break the graph (it did: "Unsupported torch.* op returned non-Tensor").
    A = random_matrix((*batch, 9, 7), seed=5).requires_grad_()

    def f(a):
        U, S, Vh = pk.ops.truncated_svd(a, 3)
        return ((U * S.unsqueeze(-2)) @ Vh).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g_c,) = torch.autograd.grad(compiled(A), A)
    (g_e,) = torch.autograd.grad(f(A), A)
    torch.testing.assert_close(g_c, g_e)


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,exc,text", [
    (lambda A: pk.ops.truncated_svd(A, 0), ValueError, "k must be"),
    (lambda A: pk.ops.truncated_svd(A, 7), ValueError, "k must be"),
    (lambda A: pk.ops.truncated_svd(A, 2.0), TypeError, "k must be an int"),
    (lambda A: pk.ops.truncated_svd(A[0, 0], 1), ValueError, "at least 2-D"),
    (lambda A: pk.ops.truncated_svd(A, 2, method="qr"), ValueError, "method must be"),
    (lambda A: pk.ops.truncated_svd(A, 2, niter=-1), ValueError, "niter"),
    (lambda A: pk.ops.truncated_svd(A, 2, oversample=-1), ValueError, "oversample"),
    (lambda A: pk.ops.truncated_svd(A.int(), 2), TypeError, "A must be"),
    (lambda A: pk.ops.truncated_svd(A.numpy(), 2), TypeError, "torch.Tensor"),
])
def test_bad_inputs(call, exc, text):
    A = random_matrix((2, 8, 6))
    with pytest.raises(exc, match=text):
        call(A)
