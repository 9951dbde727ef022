"""pk.ops.block_rotate / rotated_linear and the block_outer reduction against float64 einsum
references, gradcheck, opcheck and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import peft_kernels as pk
from peft_kernels.ops.block_rotate import _block_outer
from tolerances import TOLERANCES, assert_close


def rotations(k, b, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(k, b, b, generator=g, dtype=torch.float64) / b
    return torch.linalg.matrix_exp(K - K.mT).to(device, dtype)


def rotate_ref(x, R, transpose):
    k, b, _ = R.shape
    M = R.mT if transpose else R
    blocks = x.double().reshape(*x.shape[:-1], k, b)
    return torch.einsum("...kj,kij->...ki", blocks, M.double()).reshape(x.shape)


# On CUDA: compile-time block sizes (powers of 2 up to 64), runtime b <= 64 (3, 33, 48), and the
# untiled kernels past 64. float16 / bfloat16: the tiles staged by 8-element (16-byte) vectors
# where k * b % 8 == 0 (b = 8, 16, 32, 48, 64), element by element otherwise.
@pytest.mark.parametrize("b", [1, 2, 3, 4, 8, 16, 32, 33, 48, 64, 65])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_rotate_matches_reference(device, b, transpose, dtype):
    k = 5
    R = rotations(k, b, dtype, device)
    x = torch.randn(3, 7, k * b, dtype=dtype, device=device)
    y = pk.ops.block_rotate(x, R, transpose=transpose)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, rotate_ref(x.cpu(), R.cpu(), transpose), dtype, "y")


# CUDA: rows = 1 and 70 take one row slice (the outer kernels store out themselves), rows = 5000
# several (partial sums, then block_outer_reduce_kernel's stores: in half precision for the
# float16 / bfloat16 cases).
@pytest.mark.parametrize("b", [1, 3, 8, 32, 48, 64, 65])
@pytest.mark.parametrize("rows", [0, 1, 70, 5000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_outer_matches_reference(device, b, rows, dtype):
    k = 4
    a = torch.randn(rows, k * b, dtype=dtype, device=device)
    c = torch.randn(rows, k * b, dtype=dtype, device=device)
    got = _block_outer(a, c, b, 1)
    want = torch.einsum("nki,nkj->kij", a.double().cpu().view(rows, k, b), c.double().cpu().view(rows, k, b))
    # a sum over `rows` products: scale the tolerance by the sum's magnitude, sqrt(rows)
    assert got.shape == (k, b, b)
    assert_close(got / max(rows, 1) ** 0.5, want / max(rows, 1) ** 0.5, dtype, "outer")


# The rotate kernel's multi-stage row loop (CUDA): with k * b <= 64 there is one column tile, so
# the grid has at most 2048 row groups; 196613 rows = 6145 tiles of 32 rows make each block stage
# 4 tiles through its one shared buffer (the last block 1 tile, partial: 5 rows).
@pytest.mark.parametrize("k, b, transpose", [
    (1, 8, False),  # compile-time b = 8 (float16 / bfloat16: 8-element vector staging)
    (2, 3, True),   # runtime b = 3, element-by-element staging (k * b = 6)
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_rotate_many_rows(device, k, b, transpose, dtype):
    rows = 6145 * 32 - 27
    R = rotations(k, b, dtype, device)
    x = torch.randn(rows, k * b, dtype=dtype, device=device)
    y = pk.ops.block_rotate(x, R, transpose=transpose)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, rotate_ref(x.cpu(), R.cpu(), transpose), dtype, "y")


def test_outer_is_deterministic():
    a, c = torch.randn(20000, 64), torch.randn(20000, 64)
    first = _block_outer(a, c, 8, 1)
    torch.set_num_threads(1)
    try:
        single = _block_outer(a, c, 8, 1)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(first, single)


def test_non_contiguous_input():
    R = rotations(4, 8)
    x = torch.randn(32, 10, dtype=torch.float64).mT  # [10, 32], non-contiguous
    torch.testing.assert_close(pk.ops.block_rotate(x, R), rotate_ref(x, R, False))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dim", [1, -3])
def test_rotate_over_a_middle_dimension(device, memory_format, dim):
    # The channels of an [N, C, H, W] batch: the same as moving them last, rotating, moving back.
    R = rotations(3, 4, device=device).requires_grad_()
    x = torch.randn(2, 12, 5, 3, dtype=torch.float64, device=device)
    x = x.to(memory_format=memory_format).requires_grad_()
    y = pk.ops.block_rotate(x, R, dim=dim)
    yr = rotate_ref(x.detach().movedim(1, -1).cpu(), R.detach().cpu(), False).movedim(-1, 1)
    torch.testing.assert_close(y.cpu(), yr, rtol=1e-12, atol=1e-12)
    if device == "cpu":
        assert torch.autograd.gradcheck(lambda x, R: pk.ops.block_rotate(x, R, dim=dim), (x, R))


# On CUDA the backward's kernels: rotate (dx) and outer (dR) for a compile-time (4) and a runtime
# (3) block size.
@pytest.mark.parametrize("b", [4, 3])
def test_gradcheck_rotate(device, b):
    R = rotations(3, b, device=device).requires_grad_()
    x = torch.randn(5, 3 * b, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, R: pk.ops.block_rotate(x, R), (x, R))
    assert torch.autograd.gradcheck(lambda x, R: pk.ops.block_rotate(x, R, transpose=True), (x, R))


# On CUDA: the weight folded by the rotate kernel (transpose), dR from the outer kernel over dx, x.
def test_rotated_linear_matches_reference_and_gradcheck(device):
    torch.manual_seed(0)
    k, b, out = 4, 4, 6
    f64 = dict(dtype=torch.float64, device=device)
    params = torch.randn(k, b, b, **f64).requires_grad_()
    x = torch.randn(2, 3, k * b, **f64).requires_grad_()
    w = torch.randn(out, k * b, **f64)
    bias = torch.randn(out, **f64).requires_grad_()
    # CUDA's expm and GEMMs sum in other orders than the CPU's: the float64 table there.
    tol = dict(rtol=1e-12, atol=1e-12) if device == "cpu" else TOLERANCES[torch.float64]

    def kernel(x, params, bias):
        R = pk.ops.expm(params - params.mT)
        return pk.ops.rotated_linear(x, w, R, bias)

    def reference(x, params, bias):
        M = torch.block_diag(*torch.linalg.matrix_exp(params - params.mT))
        return F.linear(x @ M.T, w, bias)

    y, yr = kernel(x, params, bias), reference(x, params, bias)
    torch.testing.assert_close(y, yr, **tol)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, params, bias], dy)
    want = torch.autograd.grad(yr, [x, params, bias], dy)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-10, atol=tol["atol"])
    assert torch.autograd.gradcheck(kernel, (x, params, bias))


def test_opcheck():
    R = rotations(3, 4)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.peft_kernels.block_rotate.default, (x, R.requires_grad_(), False, 1))
    torch.library.opcheck(torch.ops.peft_kernels.block_outer.default, (x.detach(), x.detach() * 2, 4, 1))
    w = torch.randn(7, 12, dtype=torch.float64)
    torch.library.opcheck(torch.ops.peft_kernels.rotated_linear.default, (x, w, None, R))


def test_compile_fullgraph():
    params = torch.zeros(3, 4, 4, requires_grad=True)
    w = torch.randn(5, 12)

    def f(x):
        return pk.ops.rotated_linear(x, w, pk.ops.expm(params - params.mT)).square().sum()

    x = torch.randn(6, 12)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g_c,) = torch.autograd.grad(compiled(x), params)
    (g_e,) = torch.autograd.grad(f(x), params)
    torch.testing.assert_close(g_c, g_e)


def test_bad_inputs():
    R = rotations(3, 4, torch.float32)
    with pytest.raises(ValueError, match=r"must equal k \* b = 12"):
        pk.ops.block_rotate(torch.randn(2, 10), R)
    with pytest.raises(ValueError, match=r"rotations must have shape \[k, b, b\]"):
        pk.ops.block_rotate(torch.randn(2, 12), torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="rotations has dtype"):
        pk.ops.block_rotate(torch.randn(2, 12), R.double())
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16 on CPU"):
        pk.ops.block_rotate(torch.randn(2, 12).int(), R.int())
    with pytest.raises(ValueError, match="0-D"):
        pk.ops.block_rotate(torch.tensor(1.0), R)
    with pytest.raises(ValueError, match=r"dim must be an int in \[-2, 2\)"):
        pk.ops.block_rotate(torch.randn(2, 12), R, dim=2)
    with pytest.raises(ValueError, match="one device"):
        pk.ops.block_rotate(torch.randn(2, 12), R.to("meta"))
    with pytest.raises(ValueError, match="block_size"):
        _block_outer(torch.randn(2, 12), torch.randn(2, 12), 5, 1)
    with pytest.raises(ValueError, match="c must have a's shape"):
        _block_outer(torch.randn(2, 12), torch.randn(3, 12), 4, 1)
    with pytest.raises(ValueError, match="frozen"):
        pk.ops.rotated_linear(torch.randn(2, 12), torch.randn(5, 12, requires_grad=True), R)
    with pytest.raises(ValueError, match="k \\* b = in_features"):
        pk.ops.rotated_linear(torch.randn(2, 16), torch.randn(5, 16), R)
