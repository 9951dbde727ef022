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
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), **TOLERANCES[dtype],
        msg=(lambda m: f"{msg}: {m}") if msg else None,
    )
