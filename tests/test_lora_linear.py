"""pk.ops.lora_linear against reference.lora_linear (float64), gradcheck, opcheck, bad inputs."""
import math

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R
from tolerances import assert_close

ACTS = [None, "relu", "gelu", "silu"]


def make_inputs(lead, in_f, out_f, r, dtype, device, bias=True, b_scale=1.0):
    g = torch.Generator().manual_seed(hash((lead, in_f, out_f, r)) % 2**31)
    bound = 1.0 / math.sqrt(in_f)
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64)
    w = (torch.rand(out_f, in_f, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(out_f, generator=g, dtype=torch.float64) * 2 - 1) * bound if bias else None
    a = (torch.rand(r, in_f, generator=g, dtype=torch.float64) * 2 - 1) * bound
    bb = torch.randn(out_f, r, generator=g, dtype=torch.float64) * b_scale / math.sqrt(r)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return to(x), to(w), to(b), to(a), to(bb)


def check_against_reference(x, w, b, a, bb, *, scaling, p, act, dtype):
    seed = pk.ops.draw_dropout_seed(x.device) if p > 0 else None
    x_k = x.detach().clone().requires_grad_()
    a_k, bb_k = a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()
    b_k = None if b is None else b.detach().clone().requires_grad_()
    y = pk.ops.lora_linear(x_k, w, a_k, bb_k, scaling=scaling, bias=b_k, dropout_p=p,
                           activation=act, seed=seed)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], w.shape[0])
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, [t for t in (x_k, a_k, bb_k, b_k) if t is not None],
                                dy.to(y.device, dtype))

    d = lambda t: None if t is None else t.detach().double().cpu().requires_grad_()
    xr, ar, br, bias_r = d(x), d(a), d(bb), d(b)
    mask = None
    if p > 0:
        n_rows = x.numel() // x.shape[-1]
        mask = R.dropout_keep_mask(int(seed.item()), n_rows, x.shape[-1], p).view(x.shape)
    yr = R.lora_linear(xr, w.double().cpu(), ar, br, scaling=scaling, bias=bias_r, dropout_p=p,
                       activation=act, keep_mask=mask)
    grads_r = torch.autograd.grad(yr, [t for t in (xr, ar, br, bias_r) if t is not None], dy)
    assert_close(y, yr, dtype, "y")
    for name, got, want in zip(["dx", "dA", "dB", "dbias"], grads, grads_r):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("lead", [(5,), (3, 67)])  # 67*3 rows take the merged-weight path at p=0
@pytest.mark.parametrize("r", [1, 8, 64])
def test_matches_reference_float64(device, act, p, lead, r):
    x, w, b, a, bb = make_inputs(lead, 37, 29, r, torch.float64, device)
    check_against_reference(x, w, b, a, bb, scaling=0.75, p=p, act=act, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 5, 3, 1), (300, 70, 130, 16), (2000, 96, 80, 8)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_matches_reference_shapes(device, dtype, bias, shape, p):
    n, in_f, out_f, r = shape
    x, w, b, a, bb = make_inputs((n,), in_f, out_f, r, dtype, device, bias=bias)
    check_against_reference(x, w, b, a, bb, scaling=2.0, p=p, act=None, dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("in_f, p", [
    (200, 0.0),  # no dropout: cuBLAS and the rank-pair operands only
    (200, 0.1),  # lora_dropout_kernel's vector path, every 8-column group full
    (204, 0.1),  # vector path, the last group half full (in % 8 == 4: its second Vec4 skipped)
    (203, 0.1),  # scalar path (in % 4 != 0), the last group 3 columns
])
def test_cuda_half_types(dtype, act, in_f, p):
    x, w, b, a, bb = make_inputs((4, 129), in_f, 72, 16, dtype, "cuda")
    check_against_reference(x, w, b, a, bb, scaling=0.5, p=p, act=act, dtype=dtype)


@pytest.mark.cuda
def test_cuda_dropout_over_several_chunks_and_many_rows():
    # for_dropped_chunks with two 64 MiB chunks: float32 x of 70000 x 252 (70.6 MB) splits into
    # 66576 + 3424 rows (the second chunk's mask at row0 > 0), and both the first chunk and dx's
    # in-place masking (70000 rows) run more than 65535 rows, so lora_dropout_kernel's grid.y loop
    # takes a second lap; in % 8 == 4 also ends each row on a half-full vector group.
    x, w, b, a, bb = make_inputs((70000,), 252, 16, 4, torch.float32, "cuda")
    check_against_reference(x, w, b, a, bb, scaling=2.0, p=0.1, act=None, dtype=torch.float32)


@pytest.mark.cuda
def test_cuda_float16_rank_pair_overflow():
    # lora_rank_pair_kernel where scaling * value overflows float16 (hi = +-Inf): the [hi, lo]
    # operands of dB (a = s pre = 1e5) and of dA, dx (dpre = s dy B = 8e5) must give the unfused
    # layer's +-Inf (lo = 0), never Inf - Inf = NaN. One row and r = 1, so every expected value is
    # a single product: the float64 reference rounded to float16 is +-Inf (y, dx, dA, dB) or exact
    # (dbias = dy).
    signs = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    x = signs[None, :]                                        # [1, 8]
    a = 0.125 * signs[None, :]                                # pre = x A^T = 1
    dy = signs[None, :4]                                      # [1, 4]
    bb = 2.0 * dy.T                                           # g = dy B = 8
    w = torch.full((4, 8), 0.01, dtype=torch.float64)         # dy W = 0: dx = s g A = +-1e5
    b = torch.full((4,), 0.01, dtype=torch.float64)
    scaling = 1e5
    h = lambda t: t.to("cuda", torch.float16)
    x_k, a_k, bb_k, b_k = (h(t).requires_grad_() for t in (x, a, bb, b))
    y = pk.ops.lora_linear(x_k, h(w), a_k, bb_k, scaling=scaling, bias=b_k)
    grads = torch.autograd.grad(y, [x_k, a_k, bb_k, b_k], h(dy))

    xr, ar, br, bias_r = (t.clone().requires_grad_() for t in (x, a, bb, b))
    yr = R.lora_linear(xr, w, ar, br, scaling=scaling, bias=bias_r)
    grads_r = torch.autograd.grad(yr, [xr, ar, br, bias_r], dy)
    for name, got, want in zip(["y", "dx", "dA", "dB", "dbias"], (y, *grads), (yr, *grads_r)):
        want = want.detach().to(torch.float16)
        if name != "dbias":
            assert want.isinf().all(), name  # the case's premise: every value past 65504
        assert got.dtype == torch.float16 and not got.isnan().any(), f"{name}: NaN {got}"
        torch.testing.assert_close(got.detach().cpu(), want, rtol=0, atol=0, msg=name)


@pytest.mark.cuda
def test_cuda_matches_cpu_mask():
    """The same seed gives the same dropout mask on both devices."""
    x, w, b, a, bb = make_inputs((64,), 50, 20, 4, torch.float64, "cpu")
    seed = torch.tensor([12345], dtype=torch.int64)
    y_cpu = pk.ops.lora_linear(x, w, a, bb, bias=b, dropout_p=0.5, seed=seed)
    cu = lambda t: t.cuda()
    y_gpu = pk.ops.lora_linear(cu(x), cu(w), cu(a), cu(bb), bias=cu(b), dropout_p=0.5, seed=cu(seed))
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)


def test_non_contiguous_inputs(device):
    x, w, b, a, bb = make_inputs((6, 40), 33, 21, 8, torch.float64, device)
    x_nc = x.transpose(0, 1)  # [40, 6, 33], non-contiguous
    assert not x_nc.is_contiguous()
    w_nc = w.t().contiguous().t()
    a_nc = a.t().contiguous().t()
    for p in (0.0, 0.2):
        check_against_reference(x_nc, w_nc, b, a_nc, bb, scaling=1.5, p=p, act="gelu",
                                dtype=torch.float64)
    x_slice = torch.randn(12, 66, dtype=torch.float64, device=device)[:, ::2]
    check_against_reference(x_slice, w, b, a, bb, scaling=1.0, p=0.0, act=None, dtype=torch.float64)


def test_eval_mode_and_p0_are_exact(device):
    x, w, b, a, bb = make_inputs((40,), 24, 16, 4, torch.float64, device)
    no_drop = pk.ops.lora_linear(x, w, a, bb, bias=b, dropout_p=0.0)
    evaluated = pk.ops.lora_linear(x, w, a, bb, bias=b, dropout_p=0.9, training=False)
    assert torch.equal(no_drop, evaluated)


def test_dropout_statistics(device):
    """With W = 0, A = I, B = I the op returns drop(x) itself: check the drop rate and scaling."""
    n, d, p = 4000, 64, 0.3
    x = torch.rand(n, d, dtype=torch.float64, device=device) + 0.5  # no zeros of its own
    eye = torch.eye(d, dtype=torch.float64, device=device)
    y = pk.ops.lora_linear(x, torch.zeros(d, d, dtype=torch.float64, device=device), eye, eye,
                           dropout_p=p)
    kept = y != 0
    frac = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / (n * d))
    assert abs((1 - frac) - p) < 5 * sigma, f"drop rate {1 - frac:.4f}, expected {p} ± {5 * sigma:.4f}"
    torch.testing.assert_close(y[kept], (x / (1 - p))[kept], rtol=1e-12, atol=0)
    # Rows and columns decorrelated: per-column drop rates stay within 5 sigma of p.
    col = 1 - kept.double().mean(0)
    assert (col - p).abs().max().item() < 5 * math.sqrt(p * (1 - p) / n)


def test_tiny_dropout_rate_is_not_rounded_to_zero(device):
    """The mask resolves p to 2^-16 (16-bit fields); any p > 0 still drops (rate >= 2^-16)."""
    n, d, p = 1024, 1024, 1e-7
    x = torch.rand(n, d, device=device) + 0.5
    eye = torch.eye(d, device=device)
    seed = torch.tensor([5], device=device)
    y = pk.ops.lora_linear(x, torch.zeros(d, d, device=device), eye, eye, dropout_p=p, seed=seed)
    mask = R.dropout_keep_mask(5, n, d, p)
    assert torch.equal((y != 0).cpu(), mask)
    assert 0 < (~mask).sum().item() < 64  # 16 expected at rate 2^-16 over 2^20 entries


def test_dropout_seed_determines_mask(device):
    x, w, b, a, bb = make_inputs((50,), 30, 10, 30, torch.float64, device)
    s1 = torch.tensor([7], device=device)
    s2 = torch.tensor([8], device=device)
    y1 = pk.ops.lora_linear(x, w, a, bb, dropout_p=0.5, seed=s1)
    assert torch.equal(y1, pk.ops.lora_linear(x, w, a, bb, dropout_p=0.5, seed=s1))
    assert not torch.equal(y1, pk.ops.lora_linear(x, w, a, bb, dropout_p=0.5, seed=s2))
    torch.manual_seed(3)
    y_default = pk.ops.lora_linear(x, w, a, bb, dropout_p=0.5)
    torch.manual_seed(3)
    seed = pk.ops.draw_dropout_seed(device)
    assert torch.equal(y_default, pk.ops.lora_linear(x, w, a, bb, dropout_p=0.5, seed=seed))


def test_weight_receives_no_gradient_and_empty_batch(device):
    x, w, b, a, bb = make_inputs((0, 7), 12, 5, 2, torch.float64, device)
    a.requires_grad_()
    y = pk.ops.lora_linear(x, w, a, bb, bias=b)
    assert y.shape == (0, 7, 5)
    y.sum().backward()
    assert w.grad is None and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck(act, p):
    x, w, b, a, bb = make_inputs((3, 4), 9, 7, 3, torch.float64, "cpu")
    seed = torch.tensor([99])
    inputs = [t.requires_grad_() for t in (x, a, bb, b)]
    fn = lambda x_, a_, bb_, b_: pk.ops.lora_linear(
        x_, w, a_, bb_, scaling=1.3, bias=b_, dropout_p=p, activation=act, seed=seed)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(device, p):
    x, w, b, a, bb = make_inputs((2, 5), 12, 6, 3, torch.float64, device)
    seed = torch.tensor([5], device=device) if p else None
    for t in (x, a, bb, b):
        t.requires_grad_()
    fwd = torch.ops.peft_kernels.lora_linear_fwd.default
    torch.library.opcheck(fwd, (x, w, a, bb, b, seed, 0.5, p, 2))
    torch.library.opcheck(fwd, (x.detach(), w, a.detach(), bb.detach(), None, seed, 0.5, p, 0))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_backward_op(device, p):
    # The backward op has no autograd of its own (double backward is not supported).
    from peft_kernels.ops.lora_linear import _lora_linear_fwd

    x, w, b, a, bb = make_inputs((2, 5), 12, 6, 3, torch.float64, device)
    seed = torch.tensor([5], device=device) if p else None
    _, pre = _lora_linear_fwd(x, w, a, bb, b, seed, 0.5, p, 1)
    dy = torch.randn(2, 5, 6, dtype=torch.float64, device=device)
    for flags in [(True, True, True, True), (False, True, False, False)]:
        torch.library.opcheck(torch.ops.peft_kernels.lora_linear_bwd.default,
                              (dy, x, w, a, bb, pre, seed, 0.5, p, 1, *flags),
                              test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_no_graph_breaks():
    x, w, b, a, bb = make_inputs((4, 6), 10, 8, 2, torch.float32, "cpu")
    a.requires_grad_()
    bb.requires_grad_()

    def f(x_, a_, bb_):
        return pk.ops.lora_linear(x_, w, a_, bb_, bias=b, scaling=0.5, activation="silu").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, a, bb)
    out.backward()
    ga, gb = a.grad.clone(), bb.grad.clone()
    a.grad = bb.grad = None
    f(x, a, bb).backward()
    torch.testing.assert_close(out, f(x, a, bb))
    torch.testing.assert_close(ga, a.grad)
    torch.testing.assert_close(gb, bb.grad)


# --------------------------------------------------------------------------------- bad inputs
def _ok(device="cpu", dtype=torch.float32):
    x, w, b, a, bb = make_inputs((4,), 6, 5, 2, dtype, device)
    return dict(x=x, weight=w, lora_A=a, lora_B=bb, bias=b)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(weight=torch.randn(5, 7)), ValueError, "weight must have shape"),
        (dict(weight=torch.randn(5)), ValueError, "weight must be 2-D"),
        (dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A must have shape"),
        (dict(lora_A=torch.randn(0, 6), lora_B=torch.randn(5, 0)), ValueError, "r = lora_A.shape"),
        (dict(lora_B=torch.randn(5, 3)), ValueError, "lora_B must have shape"),
        (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
        (dict(x=torch.randn(4, 6, dtype=torch.float64)), TypeError, "weight has dtype"),
        (dict(lora_B=torch.randn(5, 2, dtype=torch.float64)), TypeError, "lora_B has dtype"),
        (dict(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, "x must be float32, float64, float16 or bfloat16"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have shape"),
        (dict(lora_A=torch.randn(2, 6, device="meta")), ValueError, "lora_A is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, exc, match):
    args = _ok()
    args.update(change)
    with pytest.raises(exc, match=match):
        pk.ops.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], bias=args["bias"])


def test_bad_options_raise_clear_errors():
    a = _ok()
    call = lambda **kw: pk.ops.lora_linear(a["x"], a["weight"], a["lora_A"], a["lora_B"], **kw)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            call(dropout_p=p)
    with pytest.raises(ValueError, match="activation must be one of"):
        call(activation="tanh")
    with pytest.raises(ValueError, match="scaling must be finite"):
        call(scaling=float("nan"))
    with pytest.raises(ValueError, match="seed must be a one-element int64"):
        call(dropout_p=0.5, seed=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="weight must be frozen"):
        pk.ops.lora_linear(a["x"], a["weight"].requires_grad_(), a["lora_A"], a["lora_B"])


@pytest.mark.cuda
def test_mixed_devices_raise_clear_error():
    args = _ok()
    with pytest.raises(ValueError, match="lora_B is on cuda"):
        pk.ops.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"].cuda())


def test_half_precision_beside_float32_is_refused_on_cpu():
    args = _ok(dtype=torch.float16)
    with pytest.raises(TypeError, match="x has dtype Half but another floating-point argument"):
        pk.ops.lora_linear(args["x"], args["weight"].float(), args["lora_A"], args["lora_B"])
