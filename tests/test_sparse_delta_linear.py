"""pk.ops.sparse_delta_linear against reference.sparse_delta_linear (dense W + Δ in float64, the
dense gradient of Δ read at the k entries), gradcheck, opcheck, determinism, bad inputs."""
import math

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R
from tolerances import assert_close


def make_inputs(lead, in_f, out_f, k, dtype, device, bias=True, index_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_f)
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64)
    w = (torch.rand(out_f, in_f, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(out_f, generator=g, dtype=torch.float64) * 2 - 1) * bound if bias else None
    idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(index_dtype)
    v = torch.randn(k, generator=g, dtype=torch.float64) * bound
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return to(x), to(w), to(b), idx.to(device), to(v)


def at_offset(t, offset):
    """A contiguous copy of t that starts `offset` elements into its storage: for offset 1 not
    16-byte aligned (the host passes contiguous tensors on as they are, offset included)."""
    buf = t.new_empty(t.numel() + offset)
    return buf[offset:].view(t.shape).copy_(t)


# ~25 ms on a GPU: what check runs on a side stream is queued behind this.
SLEEP_CYCLES = 50_000_000


def check(x, w, b, idx, v, dtype, offset=0, stream=None):
    """The op's y and gradients against the float64 reference. offset: x and dy start that many
    elements into their storage. stream: the op runs on this CUDA stream behind a GPU sleep, and
    its inputs are copied there after the sleep, so a kernel launched on any other stream would
    read them before they are written."""
    dy = torch.randn((*x.shape[:-1], w.shape[0]), dtype=torch.float64,
                     generator=torch.Generator().manual_seed(1))
    dy_dev = dy.to(x.device, dtype)  # host-synchronous: before the sleep
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # None: no-op
        if stream is not None:
            torch.cuda._sleep(SLEEP_CYCLES)
        x_k = (at_offset(x.detach(), offset) if offset else x.detach().clone()).requires_grad_()
        dy_k = at_offset(dy_dev, offset)
        if offset:
            assert x_k.data_ptr() % 16 != 0 and dy_k.data_ptr() % 16 != 0
        v_k = v.detach().clone().requires_grad_()
        b_k = None if b is None else b.detach().clone().requires_grad_()
        y = pk.ops.sparse_delta_linear(x_k, w, idx, v_k, bias=b_k)
        assert y.dtype == dtype and y.shape == dy.shape
        wrt = [t for t in (x_k, v_k, b_k) if t is not None]
        grads = torch.autograd.grad(y, wrt, dy_k)
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    d = lambda t: None if t is None else t.detach().double().cpu().requires_grad_()
    xr, vr, br = d(x), d(v), d(b)
    yr = R.sparse_delta_linear(xr, w.double().cpu(), idx.cpu(), vr, br)
    grads_r = torch.autograd.grad(yr, [t for t in (xr, vr, br) if t is not None], dy)
    assert_close(y, yr, dtype, "y")
    for name, got, want in zip(["dx", "dvalues", "dbias"], grads, grads_r):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want, dtype, name)


ALL_DTYPES = [torch.float64, torch.float32, pytest.param(torch.float16, marks=pytest.mark.cuda),
              pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]


# 67 x 45 = 3015 weights: k = 1 (one entry), 3 (0.1%), 30 (1%), 301 (10%), 3015 (100%).
# With lead (n,) for n <= 50 every product takes the sparse kernels below 5% density; 200 rows
# take the W + Δ temporary for the products and still the sparse gradient below 7%.
DENSITIES = [1, 3, 30, 301, 3015]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", DENSITIES)
@pytest.mark.parametrize("lead", [(1,), (31,), (3, 11), (200,)])
def test_matches_reference(device, dtype, k, lead):
    check(*make_inputs(lead, 45, 67, k, dtype, device), dtype)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bias", [True, False])
def test_index_dtypes_and_no_bias(device, index_dtype, bias):
    check(*make_inputs((40,), 97, 130, 126, torch.float64, device, bias=bias,
                       index_dtype=index_dtype), torch.float64)


def test_entry_layouts(device):
    """All entries in one row, all in one column, the first and last weights."""
    out_f, in_f = 23, 19
    for idx in (torch.arange(5 * in_f, 6 * in_f), torch.arange(out_f) * in_f + 7,
                torch.tensor([0, out_f * in_f - 1])):
        x, w, b, _, _ = make_inputs((37,), in_f, out_f, 1, torch.float64, device)
        v = torch.randn(idx.numel(), dtype=torch.float64, device=device)
        check(x, w, b, idx.to(device), v, torch.float64)


def test_non_contiguous_inputs(device):
    x, w, b, idx, v = make_inputs((20, 90), 45, 67, 30, torch.float64, device)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not x_nc.is_contiguous()
    w_nc = w.t().contiguous().t()
    check(x_nc, w_nc, b, idx, v, torch.float64)


# x and dy one element (2-8 bytes) into their storage: contiguous, so used in place, and with
# in and out multiples of 8 only the alignment keeps the CUDA kernels from 16-byte vector loads:
# scalar staging of x in the spmm, of dy in the transposed spmm, of both in the sddmm tile kernel
# (one 256 x 256 tile, sparse products).
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_unaligned_inputs(device, dtype):
    check(*make_inputs((64,), 256, 256, 600, dtype, device), dtype, offset=1)


def test_empty_k_and_empty_batch(device):
    x, w, b, _, _ = make_inputs((9,), 45, 67, 1, torch.float64, device)
    idx = torch.empty(0, dtype=torch.int64, device=device)
    v = torch.empty(0, dtype=torch.float64, device=device, requires_grad=True)
    y = pk.ops.sparse_delta_linear(x, w, idx, v, bias=b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=0, atol=0)
    (gv,) = torch.autograd.grad(y.sum(), v)
    assert gv.shape == (0,)
    x0 = x[:0].clone().requires_grad_()
    _, _, _, idx1, v1 = make_inputs((9,), 45, 67, 30, torch.float64, device)
    v1.requires_grad_()
    y0 = pk.ops.sparse_delta_linear(x0, w, idx1, v1, bias=b)
    gx, gv = torch.autograd.grad(y0.sum(), (x0, v1))
    assert y0.shape == (0, 67) and gx.shape == (0, 45)
    assert torch.equal(gv, torch.zeros_like(gv))


# k = 90 of 3015 (3%) takes the dense gradient on CUDA (below 2% the sparse one), and 1800 rows
# split the sparse gradient over several token slices, summed in a fixed order.
@pytest.mark.parametrize("lead,k", [((300,), 90), ((1800,), 20)])
def test_deterministic(device, lead, k):
    x, w, b, idx, v = make_inputs(lead, 45, 67, k, torch.float32, device)
    v.requires_grad_()
    runs = []
    for _ in range(2):
        (gv,) = torch.autograd.grad(pk.ops.sparse_delta_linear(x, w, idx, v, bias=b).sum(), v)
        runs.append(gv)
    assert torch.equal(runs[0], runs[1])


# Shapes whose sparse gradient spans several column windows, row groups, token slices and rounds
# of the CUDA kernels (the other tests fit one tile), all below the dense-gradient density. The
# branches named are those of an H200's plan (227 KiB of shared memory per block).
BIG_PATTERNS = [
    ((40,), 1700, 1500, 20000),  # sddmm tiles: 3 row groups x 3 column windows
    ((70,), 520, 300, 600),  # one 304 x 520 tile; half x staged as vectors (in % 8 == 0)
    ((1800,), 45, 67, 30),  # one tile, 6-7 token slices summed by the reduce kernel
    ((1800,), 45, 67, 3),  # sddmm_direct_kernel with 6-7 token slices + reduce (3 entries)
    # out % 8 == 0: half dy staged as vectors in the transposed spmm and in the sddmm (2 windows)
    ((64,), 1024, 512, 3000),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lead,in_f,out_f,k", BIG_PATTERNS)
def test_matches_reference_over_many_tiles(device, dtype, lead, in_f, out_f, k):
    check(*make_inputs(lead, in_f, out_f, k, dtype, device, seed=5), dtype)


# 9856 of 512 x 1024 weights (1.9%): 9600 in a 24 x 400 block of rows 8-31 (or a 400 x 24 block
# of columns 3-26) and 256 in the last row. On an H200 the sddmm tiles are 424 x 760 (sized for
# the average density), so the block's tile holds 9600 entries, more than a round's 8192: two
# rounds, the second partial; the last row's tiles take one.
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout,lead", [
    ("rows", (40,)),  # several rounds, one token slice
    ("columns", (600,)),  # several rounds in each of 2 token slices (partial sums + reduce)
])
def test_entries_concentrated_in_one_tile(device, dtype, layout, lead):
    out_f, in_f = 512, 1024
    rows, cols = (torch.arange(8, 32), torch.arange(100, 500)) if layout == "rows" else (
        torch.arange(400), torch.arange(3, 27))
    idx = torch.cat([(rows[:, None] * in_f + cols).flatten(),
                     (out_f - 1) * in_f + torch.arange(0, in_f, 4)])
    x, w, b, _, _ = make_inputs(lead, in_f, out_f, 1, dtype, device, seed=7)
    g = torch.Generator().manual_seed(8)
    v = torch.randn(idx.numel(), generator=g, dtype=torch.float64) / math.sqrt(in_f)
    check(x, w, b, idx.to(device), v.to(device, dtype), dtype)


# 18 x 20: (5,) k=4 takes every sparse kernel, (3, 4) k=40 the dense paths, (70,) k=8 the
# W + Δ temporary for the products and the sparse gradient.
@pytest.mark.parametrize("lead,k", [((5,), 4), ((3, 4), 40), ((70,), 8)])
def test_gradcheck(lead, k):
    x, w, b, idx, v = make_inputs(lead, 20, 18, k, torch.float64, "cpu")
    args = [t.requires_grad_() for t in (x, v, b)]
    assert torch.autograd.gradcheck(
        lambda x_, v_, b_: pk.ops.sparse_delta_linear(x_, w, idx, v_, bias=b_), args)


def test_opcheck():
    x, w, b, idx, v = make_inputs((6,), 9, 7, 5, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.peft_kernels.sparse_delta_linear_fwd,
                          (x.requires_grad_(), w, idx, v.requires_grad_(), b))
    dy = torch.randn(6, 7)
    torch.library.opcheck(torch.ops.peft_kernels.sparse_delta_linear_bwd,
                          (dy, x.detach(), w, idx, v.detach(), True, True, True))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,k", [
    ((33,), 30),  # sparse products, sddmm tile kernel
    ((300,), 301),  # 10%: W + Delta products, dense gradient
    ((33,), 1),  # sparse products, sddmm_direct_kernel (one slice)
    ((200,), 3),  # W + Delta products, sddmm_direct_kernel (one slice)
])
def test_half_types_cuda(dtype, lead, k):
    check(*make_inputs(lead, 45, 67, k, dtype, "cuda"), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,in_f,out_f,k", BIG_PATTERNS)
def test_half_types_over_many_tiles_cuda(dtype, lead, in_f, out_f, k):
    check(*make_inputs(lead, in_f, out_f, k, dtype, "cuda", seed=5), dtype)


# The op on a side stream (check: queued behind a GPU sleep, inputs written there after it).
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,in_f,out_f,k", [
    ((600,), 1024, 1024, 3000),  # both spmm, sddmm tile kernel with 2 slices (workspace + reduce)
    ((1800,), 45, 67, 3),  # W + Delta products, sddmm_direct_kernel with 6-7 slices + reduce
])
def test_current_stream_cuda(dtype, lead, in_f, out_f, k):
    x, w, b, idx, v = make_inputs(lead, in_f, out_f, k, dtype, "cuda", seed=3)
    # Validates idx now: its check (a device-to-host copy) would otherwise wait out the sleep.
    pk.ops.sparse_delta_linear(x, w, idx, v, bias=b)
    check(x, w, b, idx, v, dtype, stream=torch.cuda.Stream())


def test_indices_revalidated_after_in_place_change(device):
    # A validated index tensor is not checked again, unless it was written to since.
    x, w, _, idx, v = make_inputs((4,), 9, 7, 5, torch.float32, device)
    pk.ops.sparse_delta_linear(x, w, idx, v)
    idx[0] = -1
    with pytest.raises(ValueError, match=r"\[0, 63\)"):
        pk.ops.sparse_delta_linear(x, w, idx, v)
    idx[0] = idx[1]
    with pytest.raises(ValueError, match="sorted"):
        pk.ops.sparse_delta_linear(x, w, idx, v)
    # Another weight shape is validated on its own.
    pk.ops.sparse_delta_linear(x, w, idx.sort().values.unique()[:4], v[:4])
    with pytest.raises(ValueError, match=r"\[0, 18\)"):
        pk.ops.sparse_delta_linear(x, w[:2], torch.tensor([0, 1, 2, 40], device=device), v[:4])


@pytest.mark.parametrize("lead", [(4,), (300,)])  # the sparse and the dense path
@pytest.mark.parametrize("position, value", [(1, 10**12), (0, 10**12), (-1, -7)])
def test_write_behind_autograd_back(device, lead, position, value):
    # .data writes keep the version counter: the CPU checks every call anyway; CUDA's validated
    # tensors are clamped into the matrix and made non-decreasing, so the call stays inside W, x
    # and dy (an entry written past its successor, at (0, ...), left the sorted order that the
    # kernels' shared-memory windows rely on, with columns thousands apart at in = 3000).
    x, w, _, idx, v = make_inputs(lead, 3000, 60, 40, torch.float32, device)
    x.requires_grad_(True)
    v.requires_grad_(True)
    pk.ops.sparse_delta_linear(x, w, idx, v)
    idx.data[position] = value
    if device == "cpu":
        with pytest.raises(ValueError, match=r"\[0, 180000\)"):
            pk.ops.sparse_delta_linear(x, w, idx, v)
    else:
        y = pk.ops.sparse_delta_linear(x, w, idx, v)
        y.sum().backward()
        torch.cuda.synchronize()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(v.grad).all()


def test_bad_inputs():
    x, w, b, idx, v = make_inputs((4,), 9, 7, 5, torch.float32, "cpu")
    op = pk.ops.sparse_delta_linear
    with pytest.raises(ValueError, match="sorted"):
        op(x, w, idx.flip(0), v)
    with pytest.raises(ValueError, match="sorted in increasing order without duplicates"):
        op(x, w, torch.tensor([1, 1, 2, 3, 4]), v)
    with pytest.raises(ValueError, match=r"\[0, 63\)"):
        op(x, w, torch.tensor([0, 1, 2, 3, 63]), v)
    with pytest.raises(ValueError, match=r"\[0, 63\)"):
        op(x, w, torch.tensor([-1, 1, 2, 3, 4]), v)
    with pytest.raises(TypeError, match="indices must be int64 or int32"):
        op(x, w, idx.float(), v)
    with pytest.raises(ValueError, match="indices must be 1-D"):
        op(x, w, idx.view(5, 1), v)
    with pytest.raises(ValueError, match="values must have one entry per index"):
        op(x, w, idx, v[:4])
    with pytest.raises(TypeError, match="values has dtype"):
        op(x, w, idx, v.double())
    with pytest.raises(ValueError, match="weight must have shape"):
        op(x, w[:, :8], idx, v)
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, w, idx, v, bias=b[:3])
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16"):
        op(x.int(), w.int(), idx, v.int())
    with pytest.raises(ValueError, match="weight must be frozen"):
        op(x, w.clone().requires_grad_(), idx, v)
    with pytest.raises(ValueError, match="on one device"):
        op(x, w, idx.to("meta"), v)
