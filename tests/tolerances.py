"""The one tolerance table: kernel output in `dtype` vs the float64 reference.

Inputs in the tests are scaled so outputs and gradients are O(1) (nn.Linear-style weights,
unit-variance activations). Each bound is a few times the worst rounding the kernel can add:
- float64: reductions of length K <= a few thousand accumulate at most ~K * 1.1e-16 relative;
  1e-10 leaves two orders of margin while catching any real error (a wrong index or mask
  element moves an output by O(1e-2) or more).
- float32: the same sums at 6e-8 per operation give ~1e-5 typical and ~6e-5 worst case for K ~ 1e3;
  2e-4 covers reductions over N of several thousand rows (dA, dB).
- float16 (11-bit significand) and bfloat16 (8-bit): inputs are rounded once (4.9e-4 and 3.9e-3
  relative) and outputs once more; accumulation is float32. 1e-2 and 4e-2 absolute/relative
  bound both roundings with margin for O(1) values.
Reductions over many rows (dA, dB, dvalues) are not O(1): they grow like the square root of the
row count, and their rounding error with them. So atol scales with the reference's largest
magnitude (max(1, max|expected|)): a float32 dA of magnitude ~800 over a few thousand rows
carries ~5e-4 absolute error (6e-7 of its scale), which a fixed 2e-4 would flag depending on the
dropout mask drawn.
"""
import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-4, atol=2e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = ""):
    """Compare in float64 against a float64 reference with `dtype`'s tolerance."""
    expected = expected.detach().double().cpu()
    tol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
        msg=(lambda m: f"{msg}: {m}") if msg else None,
    )


# pk.ops.expm against scipy.linalg.expm / expm_frechet (float64), relative error in the 1-norm.
# float64: the Taylor degrees are chosen so the truncation error is below the unit roundoff, and
# the measured error (random, defective, nilpotent, diagonal and skew matrices, n <= 130,
# ||A||_1 <= 1e3) stays <= 4e-13 forward and <= 3e-14 backward, as torch.linalg.matrix_exp's does:
# 1e-12 (the specification) holds with margin.
# float32: rounding A to float32 alone moves exp(A) by up to cond(exp, A) * u32 relative, where
# cond(exp, A) >= ||A|| (equality for normal A), u32 = 2^-24, and each of the ~log2(||A||)
# squarings adds its rounding. The bound is therefore max(1e-5, 8 * ||A||_1 * u32): 1e-5 up to
# ||A||_1 ~ 20, growing with the norm above (4.8e-4 at 1e3, where up to 2.5e-4 = 4.1 ||A|| u32
# was measured, on a 2 x 2 rotation by 1000 rad).
EXPM_RTOL_FLOAT64 = 1e-12
U32 = 2.0**-24


def expm_rtol(dtype: torch.dtype, norm1: float) -> float:
    if dtype == torch.float64:
        return EXPM_RTOL_FLOAT64
    return max(1e-5, 8.0 * norm1 * U32)


# pk.ops.truncated_svd(method="jacobi") against numpy's LAPACK SVD (float64), errors relative to
# the largest singular value S_max. The Jacobi sweeps stop once every column pair's cosine is
# below tol = eps sqrt(m), so U, V are orthonormal to O(n tol); the kernels' rotated float32
# columns carry S to O(sweeps eps) (measured <= 7.6e-6 for n <= 64), which is why the op forms
# S again in float64 from the unrotated columns and V (second order in V's error):
# - float64: 1e-12 for S (the specification), orthonormality and A V - U S (measured <= 1e-14).
# - float32: 1e-6 for S, the specification's 1e-5 tightened (measured <= 1.2e-7, float32's own
#   rounding of S being 6e-8); 1e-4 for orthonormality and A V - U S of the kernels' outputs,
#   which sum n ~ 64 rounded cosines of size up to eps32 sqrt(m) ~ 1e-6 each (measured <= 2e-5).
SVD_TOLERANCES = {
    torch.float64: dict(values=1e-12, orthonormal=1e-12, residual=1e-12),
    torch.float32: dict(values=1e-6, orthonormal=1e-4, residual=1e-4),
}
