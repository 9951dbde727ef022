"""pk.ops.expm against scipy.linalg.expm / expm_frechet (float64): accuracy over matrix families,
per-matrix degree selection, gradients, NaN isolation, opcheck, compile and bad inputs."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sl
import torch

import peft_kernels as pk
from tolerances import expm_rtol

# n >= 128 takes the batched-GEMM evaluation (the CUDA path for large n too).
SIZES = [1, 2, 3, 8, 17, 32, 64, 100, 130]
NORMS = [1e-8, 1e-3, 0.1, 1.0, 10.0, 1e3]
KINDS = ["random", "jordan", "nilpotent", "diagonal", "skew"]


def make_matrix(kind: str, n: int, norm1: float, seed: int = 0) -> np.ndarray:
    """A float64 matrix of the family `kind` with 1-norm `norm1`, well conditioned for exp.

    random/diagonal matrices are shifted so that their rightmost eigenvalue is 0: exp stays
    finite at any norm, and a shift by c I only scales exp(A) by e^c. The defective family is the
    real Jordan form of eigenvalues +-i w, each with one Jordan block of size n/2 (unit coupling),
    in an orthonormal basis: exp is bounded, and no eigenvalue shift has to be computed (that of
    a defective matrix is ill-conditioned: a 1e3-norm nilpotent part makes exp itself
    ill-conditioned, ~1e4 relative error for any float64 algorithm, 50-digit mpmath as judge).
    """
    rng = np.random.default_rng(seed * 7919 + n * 31 + int(abs(np.log10(norm1)) * 10))
    if kind == "random":
        A = rng.standard_normal((n, n))
    elif kind == "jordan":
        w = max(norm1 - 1.0, 1.0)
        J = np.zeros((n, n))
        for i in range(0, n - 1, 2):
            J[i, i + 1], J[i + 1, i] = w, -w
        for i in range(n - 2):
            J[i, i + 2] = 1.0  # couples the 2 x 2 blocks (the last row of an odd n too)
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        A = Q @ J @ Q.T
    elif kind == "nilpotent":
        A = np.triu(rng.standard_normal((n, n)), 1)
    elif kind == "diagonal":
        A = np.diag(rng.standard_normal(n))
    elif kind == "skew":
        K = rng.standard_normal((n, n))
        A = K - K.T
    else:
        raise ValueError(kind)
    norm = np.abs(A).sum(0).max()
    if norm == 0.0:  # n = 1 jordan / nilpotent / skew: the zero matrix
        return A
    A = A * (norm1 / norm)
    if kind in ("random", "diagonal"):
        A = A - np.linalg.eigvals(A).real.max() * np.eye(n)
    return A


def reference_expm(A: np.ndarray) -> np.ndarray:
    """exp(A) to float64 accuracy: scipy.linalg.expm, except where scipy's own scaling and
    squaring is measurably less accurate (against 50-digit mpmath) than an exact formula:
    - strictly triangular (nilpotent) A: the finite series sum_{k<n} A^k/k! in extended
      precision (scipy: 6.5e-9 relative at n=17, ||A||_1=1e3; this kernel 3.8e-16);
    - normal A (skew, diagonal, a rotation): its unitary Schur form (scipy: 1e-11 on a 2 x 2
      rotation by 1000 rad; the Schur form 1e-13)."""
    n = A.shape[0]
    if n > 1 and not np.tril(A).any():
        N = A.astype(np.longdouble)
        term, total = np.eye(n, dtype=np.longdouble), np.eye(n, dtype=np.longdouble)
        for k in range(1, n):
            term = term @ N / k
            total = total + term
            if np.abs(term).max() <= 1e-40 * np.abs(total).max():  # the rest is below rounding
                break
        return total.astype(np.float64)
    if np.abs(A @ A.T - A.T @ A).max() <= 1e-13 * max(np.abs(A).max() ** 2, 1e-300):
        T, Z = sl.schur(A.astype(complex), output="complex")
        return ((Z * np.exp(np.diag(T))) @ Z.conj().T).real
    return sl.expm(A)


def rel1(got: np.ndarray, want: np.ndarray) -> float:
    scale = np.abs(want).sum(-2).max()
    return float(np.abs(got - want).sum(-2).max() / scale)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_scipy(kind, n, dtype):
    mats = [make_matrix(kind, n, norm) for norm in NORMS]
    A = torch.tensor(np.stack(mats), dtype=dtype)  # one batch: every matrix its own degree
    E = pk.ops.expm(A)
    assert E.dtype == dtype and E.shape == A.shape
    for i, (M, norm) in enumerate(zip(mats, NORMS)):
        want = reference_expm(A[i].double().numpy())  # exp of the matrix the kernel saw
        err = rel1(E[i].double().numpy(), want)
        assert err <= expm_rtol(dtype, norm), f"{kind} n={n} norm={norm}: rel err {err:.2e}"


@pytest.mark.parametrize("kind", ["random", "jordan", "nilpotent", "skew"])
@pytest.mark.parametrize("n", [1, 3, 8, 17, 64, 100, 130])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_matches_expm_frechet(kind, n, dtype):
    norms = [1e-6, 0.1, 1.0, 10.0, 100.0]
    A = torch.tensor(np.stack([make_matrix(kind, n, v, seed=1) for v in norms]), dtype=dtype)
    G = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    A.requires_grad_()
    pk.ops.expm(A).backward(G.to(dtype))
    for i, norm in enumerate(norms):
        want = sl.expm_frechet(A[i].detach().double().numpy().T, G[i].numpy(), compute_expm=False)
        err = rel1(A.grad[i].double().numpy(), want)
        assert err <= expm_rtol(dtype, norm), f"n={n} norm={norm}: rel err {err:.2e}"


@pytest.mark.parametrize("kind", ["random", "nilpotent", "skew"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_evaluation_alone(device, kind, norm, dtype):
    """n >= 128 evaluates a batch through shared products at the degree its matrices need
    (1..8 from the norms alone, else 12 / 18 with squarings per matrix): a matrix alone takes
    each degree in turn, with its derivative alongside."""
    A = torch.tensor(make_matrix(kind, 128, norm, seed=4), dtype=dtype).unsqueeze(0)
    G = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    E = pk.ops.expm(A.to(device)).cpu()
    L = torch.ops.peft_kernels.expm_bwd(A.to(device), G.to(device, dtype)).cpu()
    seen = A[0].double().numpy()
    assert rel1(E[0].double().numpy(), reference_expm(seen)) <= expm_rtol(dtype, norm)
    want = sl.expm_frechet(seen.T, G[0].to(dtype).double().numpy(), compute_expm=False)
    assert rel1(L[0].double().numpy(), want) <= expm_rtol(dtype, norm)


@pytest.mark.parametrize("dtype,huge", [(torch.float64, 1e300), (torch.float32, 1e30)])
def test_batched_evaluation_squarings_are_per_matrix(device, dtype, huge):
    """A huge matrix (A^2 overflows: the powers are formed again from the scaled A; ~1000
    squarings in float64, ~100 in float32) beside an ordinary one in the batched path: the call
    ends, and both matrices keep their own squarings and accuracy, forward and Frechet (skipping
    the re-formed powers gives NaN for the huge one). That one is diagonal with its largest d_i
    at 0: exp and derivative in closed form (exp(d_i); G_ij times the divided difference of exp
    at d_i, d_j), and exp is 1 there and underflows elsewhere, so the squarings add no rounding
    (a rotation's would grow 2^s-fold and leave nothing to compare)."""
    A = torch.tensor(np.stack([make_matrix("diagonal", 128, huge, seed=6),
                               make_matrix("random", 128, 10.0, seed=7)]), dtype=dtype)
    G = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    G = G.to(dtype)
    E = pk.ops.expm(A.to(device)).cpu()
    L = torch.ops.peft_kernels.expm_bwd(A.to(device), G.to(device)).cpu()
    d = np.diag(A[0].double().numpy())
    di, dj = d[:, None], d[None, :]
    with np.errstate(invalid="ignore"):  # di == dj takes the first branch
        divided = np.where(di == dj, np.exp(di), (np.exp(di) - np.exp(dj)) / (di - dj))
    tol = expm_rtol(dtype, 10.0)
    assert rel1(E[0].double().numpy(), np.diag(np.exp(d))) <= tol
    assert rel1(L[0].double().numpy(), G[0].double().numpy() * divided) <= tol
    seen = A[1].double().numpy()
    assert rel1(E[1].double().numpy(), reference_expm(seen)) <= tol
    want = sl.expm_frechet(seen.T, G[1].double().numpy(), compute_expm=False)
    assert rel1(L[1].double().numpy(), want) <= tol


@pytest.mark.parametrize("dtype,c", [(torch.float64, 0.4), (torch.float32, 1.48)])
def test_batched_evaluation_mixed_degrees(device, dtype, c):
    """The batched path (n = 128) with three matrices: c I needs degree 18 but no squaring
    (theta_12 < c <= theta_18 / 2, where log2(c / theta_18) rounds up to -1: a negative count
    once scaled it by 2), zero must give exactly exp(0) = I and L(0, G) = G, and a random one of
    norm 10 takes squarings. exp(c I) = e^c I and L(c I, G) = e^c G in closed form."""
    n = 128
    A = torch.stack([c * torch.eye(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64),
                     torch.tensor(make_matrix("random", n, 10.0, seed=9))]).to(dtype)
    G = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    G = G.to(dtype)
    E = pk.ops.expm(A.to(device)).cpu()
    L = torch.ops.peft_kernels.expm_bwd(A.to(device), G.to(device)).cpu()
    tol = expm_rtol(dtype, 10.0)
    exp_c = np.exp(A[0, 0, 0].item())
    assert rel1(E[0].double().numpy(), exp_c * np.eye(n)) <= tol
    assert rel1(L[0].double().numpy(), exp_c * G[0].double().numpy()) <= tol
    assert torch.equal(E[1], torch.eye(n, dtype=dtype))
    assert torch.equal(L[1], G[1])
    seen = A[2].double().numpy()
    assert rel1(E[2].double().numpy(), reference_expm(seen)) <= tol
    want = sl.expm_frechet(seen.T, G[2].double().numpy(), compute_expm=False)
    assert rel1(L[2].double().numpy(), want) <= tol


def test_gradient_matches_torch_matrix_exp():
    A = torch.tensor(make_matrix("random", 12, 3.0), requires_grad=True)
    G = torch.randn(12, 12, dtype=torch.float64)
    (g_pk,) = torch.autograd.grad(pk.ops.expm(A), A, G)
    (g_torch,) = torch.autograd.grad(torch.linalg.matrix_exp(A), A, G)
    torch.testing.assert_close(g_pk, g_torch, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,norm", [(1, 0.5), (3, 0.05), (5, 1.0), (4, 6.0)])
def test_gradcheck(n, norm):
    A = torch.tensor(np.stack([make_matrix("random", n, norm, seed=s) for s in range(2)]),
                     requires_grad=True)
    assert torch.autograd.gradcheck(pk.ops.expm, (A,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_skew_gives_orthogonal(dtype):
    S = torch.tensor(np.stack([make_matrix("skew", 16, v) for v in (0.01, 1.0, 30.0)]), dtype=dtype)
    R = pk.ops.expm(S)
    eye = torch.eye(16, dtype=dtype)
    deviation = (R.mT @ R - eye).abs().max().item()
    assert deviation <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_batch_shapes_and_layouts():
    A = torch.tensor(np.stack([make_matrix("random", 5, 2.0, seed=s) for s in range(6)]))
    want = torch.linalg.matrix_exp(A)
    torch.testing.assert_close(pk.ops.expm(A.view(2, 3, 5, 5)), want.view(2, 3, 5, 5))
    torch.testing.assert_close(pk.ops.expm(A[0]), want[0])  # no batch dimension
    At = A.mT  # non-contiguous
    torch.testing.assert_close(pk.ops.expm(At), torch.linalg.matrix_exp(At.contiguous()))
    assert pk.ops.expm(torch.empty(0, 4, 4)).shape == (0, 4, 4)
    assert pk.ops.expm(torch.empty(3, 0, 0)).shape == (3, 0, 0)


def test_non_finite_matrix_gives_nan_for_that_matrix_only():
    A = torch.tensor(np.stack([make_matrix("random", 6, 1.0, seed=s) for s in range(4)]),
                     requires_grad=True)
    with torch.no_grad():
        A[1, 2, 3] = float("nan")
        A[2, 0, 0] = float("inf")
    E = pk.ops.expm(A)
    assert torch.isnan(E[1]).all() and torch.isnan(E[2]).all()
    want = torch.linalg.matrix_exp(A.detach()[[0, 3]])
    torch.testing.assert_close(E.detach()[[0, 3]], want)
    E.backward(torch.ones_like(E))
    assert torch.isnan(A.grad[1]).all() and torch.isnan(A.grad[2]).all()
    assert torch.isfinite(A.grad[[0, 3]]).all()


@pytest.mark.parametrize("n", [3, 8, 49, 130])
def test_nan_in_a_small_matrix_gives_nan(device, n):
    """A NaN in a column other than the last of a near-zero matrix: its 1-norm must be NaN
    (a finite later column once replaced it: degree 1 was chosen and exp came out finite, with
    NaN only where the NaN entry was)."""
    A = torch.zeros(2, n, n, dtype=torch.float64, device=device)
    A[0, 0, 1] = float("nan")
    A.requires_grad_()
    E = pk.ops.expm(A)
    assert torch.isnan(E[0]).all()
    torch.testing.assert_close(E[1].detach(), torch.eye(n, dtype=torch.float64, device=device))
    (dA,) = torch.autograd.grad(E, A, torch.ones_like(E))
    assert torch.isnan(dA[0]).all() and torch.isfinite(dA[1]).all()


_INF_CHECK = """
import torch, peft_kernels as pk
n, device = {n}, "{device}"
A = torch.zeros(3, n, n, dtype=torch.float64, device=device)
A[0, 0, 0] = float("inf")
A[1].fill_diagonal_(0.5)
E = pk.ops.expm(A)
assert torch.isnan(E[0]).all() and torch.isfinite(E[1:]).all()
G = torch.ones_like(A)
G[2, 1, 1] = float("inf")
dA = torch.ops.peft_kernels.expm_bwd(A, G)
assert torch.isnan(dA[0]).all() and torch.isfinite(dA[1]).all()
assert not torch.isfinite(dA[2]).all()  # an Inf direction stays visible (GradScaler looks)
assert dA.is_contiguous()
"""


@pytest.mark.parametrize("n", [3, 130])
def test_inf_in_a_or_in_the_gradient_gives_nan_and_terminates(device, n):
    """An Inf in A gives NaN for that matrix, an Inf in the backward's direction a non-finite
    gradient, and neither may become a squaring count (ceil(log2(norm / theta)) of an infinite
    norm: torch.linalg.matrix_exp on CUDA queues INT64_MAX squarings; n = 130 takes the batched
    path, whose squaring loop runs on the host): the check runs in a child process with a time
    limit."""
    code = _INF_CHECK.format(n=n, device=device)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                       filter(None, [str(Path(pk.__file__).resolve().parent.parent),
                                     os.environ.get("PYTHONPATH")]))))


def test_huge_norm_terminates():
    A = torch.tensor(np.stack([make_matrix("skew", 4, 1e300), make_matrix("skew", 4, 1.0)]))
    E = pk.ops.expm(A)  # ~1000 squarings of a rotation: finishes, whatever the rounding gives
    torch.testing.assert_close(E[1], torch.linalg.matrix_exp(A[1]))


def test_opcheck():
    A = torch.tensor(make_matrix("random", 6, 2.0)).expand(2, 6, 6).contiguous().requires_grad_()
    torch.library.opcheck(torch.ops.peft_kernels.expm_fwd.default, (A,))
    G = torch.randn(2, 6, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.peft_kernels.expm_bwd.default, (A.detach(), G))


def test_compile_fullgraph():
    K = torch.randn(4, 8, 8, dtype=torch.float64, requires_grad=True)

    def f(k):
        return (pk.ops.expm(k - k.mT) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g_c,) = torch.autograd.grad(compiled(K), K)
    (g_e,) = torch.autograd.grad(f(K), K)
    torch.testing.assert_close(g_c, g_e)


def test_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        pk.ops.expm(torch.randn(3, 4))
    with pytest.raises(ValueError, match="square"):
        pk.ops.expm(torch.randn(4))
    with pytest.raises(TypeError, match="A must be"):
        pk.ops.expm(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="A must be float32, float64, float16 or bfloat16 on CPU"):
        pk.ops.expm(torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pk.ops.expm(np.eye(2))
    A = torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="grad must have A's shape"):
        torch.ops.peft_kernels.expm_bwd(A, torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="grad has dtype"):
        torch.ops.peft_kernels.expm_bwd(A, torch.randn(2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device"):
        torch.ops.peft_kernels.expm_bwd(A, torch.randn(2, 3, 3, device="meta"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 8, 17, 32, 64, 100, 256])
def test_cuda_matches_scipy(dtype, n):
    norms = NORMS[:-1]  # degrees 1, 2 or 4, 8, 12, 18 with squarings (1e3 overflows half types)
    A64 = torch.tensor(np.stack([make_matrix("random", n, v, seed=2) for v in norms]))
    A = A64.to("cuda", dtype).requires_grad_()
    G = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    E = pk.ops.expm(A)
    E.backward(G.to("cuda", dtype))
    assert E.dtype == dtype
    # float16/bfloat16: computed in float32 from the rounded input, rounded once more on output
    out_rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    for i, norm in enumerate(norms):
        seen = A[i].detach().double().cpu().numpy()
        want = sl.expm(seen)
        rtol = out_rtol.get(dtype, expm_rtol(dtype, norm))
        assert rel1(E[i].detach().double().cpu().numpy(), want) <= rtol
        gwant = sl.expm_frechet(seen.T, G[i].to(dtype).double().numpy(), compute_expm=False)
        assert rel1(A.grad[i].double().cpu().numpy(), gwant) <= rtol


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_global_kernel_reuses_its_workspace(dtype):
    """n = 100 runs the global-memory kernel, whose grid is capped at the resident blocks (~2 per
    SM): a batch of 600 makes each block evaluate several matrices in the same workspace. Six
    matrices repeated: every copy must equal its first copy bit for bit, and that one scipy."""
    norms = [1e-3, 0.1, 1.0, 10.0, 0.5, 3.0]
    base = torch.tensor(np.stack([make_matrix("random", 100, v, seed=11) for v in norms]))
    G = torch.randn(base.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    A = base.repeat(100, 1, 1).to("cuda", dtype)
    E = pk.ops.expm(A).cpu().view(100, 6, 100, 100)
    L = torch.ops.peft_kernels.expm_bwd(A, G.repeat(100, 1, 1).to("cuda", dtype))
    L = L.cpu().view(100, 6, 100, 100)
    assert torch.equal(E, E[:1].expand_as(E)) and torch.equal(L, L[:1].expand_as(L))
    for i, norm in enumerate(norms):
        seen = base[i].to(dtype).double().numpy()
        assert rel1(E[0, i].double().numpy(), sl.expm(seen)) <= expm_rtol(dtype, norm)
        want = sl.expm_frechet(seen.T, G[i].to(dtype).double().numpy(), compute_expm=False)
        assert rel1(L[0, i].double().numpy(), want) <= expm_rtol(dtype, norm)


@pytest.mark.parametrize("n", [8, 130])  # a per-matrix kernel; the batched path
def test_inputs_are_never_modified(device, n):
    """The batched path evaluates from the caller's own buffers (A and G are never copied when
    contiguous in the working dtype): no step may write them."""
    A = torch.tensor(np.stack([make_matrix("random", n, v, seed=13) for v in (0.1, 10.0)]))
    A = A.to(device)
    G = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    G = G.to(device)
    A_before, G_before = A.clone(), G.clone()
    pk.ops.expm(A)
    torch.ops.peft_kernels.expm_bwd(A, G)
    assert torch.equal(A, A_before) and torch.equal(G, G_before)
