"""LieRA: pk.ops.lie_weight / lie_linear / lie_conv2d and pk.nn.LieLinear / LieConv2d against
reference.py (W * exp(s * (B @ A)).view_as(W), then F.linear / F.conv2d) in float64."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_kernels as pk
from peft_kernels import reference as R
from tolerances import assert_close
from training import fit

SCALE = 0.7


def adapters(out, K, r, dtype, device, seed=0, scale=0.5):
    """A, B with s·B A of order 0.5: exp far from 1, no overflow."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, K, generator=g, dtype=torch.float64) * scale / math.sqrt(K)
    B = torch.randn(out, r, generator=g, dtype=torch.float64) * scale * math.sqrt(K / r)
    return A.to(device, dtype), B.to(device, dtype)


def grads_of(fn, inputs, dy):
    y = fn(*inputs)
    return y, torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy)


def leaf(t):
    return t.detach().clone().requires_grad_()


def compare(kernel, reference, tensors, frozen, dtype, dy_shape_of, names):
    """Run both on the same inputs (reference in float64 on the CPU) and compare y and grads."""
    got_in = [leaf(t) if i not in frozen else t for i, t in enumerate(tensors)]
    y = kernel(*got_in)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(y, [t for t in got_in if t.requires_grad], dy.to(y.device, dtype))
    ref_in = [t.detach().double().cpu() for t in tensors]
    ref_in = [t.requires_grad_() if i not in frozen else t for i, t in enumerate(ref_in)]
    yr = reference(*ref_in)
    want = torch.autograd.grad(yr, [t for t in ref_in if t.requires_grad], dy)
    assert_close(y, yr, dtype, "y")
    for name, g, w in zip(names, got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
# r = 40 and 70: the CUDA gradient kernel's register-resident (33 <= r <= 64) and general
# (r > 64) dA paths. 1000 x 2100: the CPU gradient's row chunks span several L2-sized blocks.
# 66000 x 40: several 32-row tiles per CUDA block. K = 40 is one column tile (128 columns, 64 in
# float64), so grid y = min(row tiles, target blocks) with 2063 row tiles (the last one 16 rows):
# generate (2048 blocks) walks a second tile in blocks 0..14, the partial one among them; grad
# (1024 blocks) 2 or 3 tiles per block. r = 8: A's tile resident in both kernels; r = 40: A
# restaged per rank chunk, and grad's dA partials in registers across the tiles; r = 70: grad's
# dA flushed per tile, the last rank chunk 6 wide.
@pytest.mark.parametrize("shape,r", [((1, 1), 1), ((7, 13), 3), ((33, 130), 8), ((6, 4, 3, 3), 5),
                                     ((20, 70), 40), ((9, 33), 70), ((1000, 2100), 16),
                                     ((66000, 40), 8), ((66000, 40), 40), ((66000, 40), 70)])
def test_lie_weight_matches_reference(device, dtype, first_order, shape, r):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    A, B = adapters(shape[0], W[0].numel(), r, dtype, device)
    compare(lambda W_, A_, B_: pk.ops.lie_weight(W_, A_, B_, scaling=SCALE, first_order=first_order),
            lambda W_, A_, B_: R.lie_weight(W_, A_, B_, SCALE, first_order),
            [W, A, B], {0}, dtype, None, ["dA", "dB"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead,in_f,out_f,r", [((5,), 12, 9, 2), ((3, 67), 40, 33, 16), ((1,), 1, 1, 1)])
def test_lie_linear_matches_reference(device, dtype, first_order, bias, lead, in_f, out_f, r):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64).to(device, dtype)
    W = (torch.randn(out_f, in_f, generator=g, dtype=torch.float64) / math.sqrt(in_f)).to(device, dtype)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    A, B = adapters(out_f, in_f, r, dtype, device)
    tensors = [x, W, A, B] + ([b] if bias else [])
    kernel = lambda x_, W_, A_, B_, *b_: pk.ops.lie_linear(
        x_, W_, A_, B_, bias=b_[0] if b_ else None, scaling=SCALE, first_order=first_order)
    reference = lambda x_, W_, A_, B_, *b_: R.lie_linear(
        x_, W_, A_, B_, b_[0] if b_ else None, SCALE, first_order)
    compare(kernel, reference, tensors, {1}, dtype, None, ["dx", "dA", "dB", "dbias"])


def test_lie_linear_over_several_row_blocks(device):
    # 2^22 / 4096 = 1024 rows per backward block (the size cap, below out / 2): blocks of
    # 1024 + 1024 + 52 output rows.
    dtype = torch.float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4096, generator=g).to(device, dtype)
    W = (torch.randn(2100, 4096, generator=g) / 64).to(device, dtype)
    A, B = adapters(2100, 4096, 4, dtype, device)
    compare(lambda *t: pk.ops.lie_linear(*t, scaling=SCALE),
            lambda *t: R.lie_linear(*t, None, SCALE),
            [x, W, A, B], {1}, dtype, None, ["dx", "dA", "dB"])


CONVS = [
    dict(in_c=6, out_c=8, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(in_c=6, out_c=9, k=(3, 2), stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=3),
    dict(in_c=4, out_c=4, k=1, stride=1, padding=0, dilation=1, groups=4),
    dict(in_c=3, out_c=5, k=5, stride=3, padding=2, dilation=1, groups=1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("cfg", CONVS)
def test_lie_conv2d_matches_reference(device, dtype, first_order, cfg):
    torch.manual_seed(4)
    conv = nn.Conv2d(cfg["in_c"], cfg["out_c"], cfg["k"], stride=cfg["stride"],
                     padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    W, b = conv.weight.detach().to(device, dtype), conv.bias.detach().to(device, dtype)
    A, B = adapters(W.shape[0], W[0].numel(), 3, dtype, device)
    x = torch.randn(2, cfg["in_c"], 11, 10, dtype=torch.float64).to(device, dtype)
    geo = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
               groups=cfg["groups"])
    compare(lambda x_, W_, A_, B_, b_: pk.ops.lie_conv2d(x_, W_, A_, B_, bias=b_, scaling=SCALE,
                                                          first_order=first_order, **geo),
            lambda x_, W_, A_, B_, b_: R.lie_conv2d(x_, W_, A_, B_, b_, SCALE, first_order, **geo),
            [x, W, A, B, b], {1}, dtype, None, ["dx", "dA", "dB", "dbias"])


def test_lie_conv2d_grouped_over_several_blocks(device):
    # 4096 out channels x K = 1152 > 2^22: two blocks of one group (2048 channels) each.
    dtype = torch.float32
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 256, 6, 5, generator=g).to(device, dtype)
    W = (torch.randn(4096, 128, 3, 3, generator=g) / 34).to(device, dtype)
    A, B = adapters(4096, 1152, 2, dtype, device)
    geo = dict(stride=1, padding=1, dilation=1, groups=2)
    compare(lambda x_, W_, A_, B_: pk.ops.lie_conv2d(x_, W_, A_, B_, scaling=SCALE, **geo),
            lambda x_, W_, A_, B_: R.lie_conv2d(x_, W_, A_, B_, None, SCALE, **geo),
            [x, W, A, B], {1}, dtype, None, ["dx", "dA", "dB"])


@pytest.mark.parametrize("first_order", [False, True])
def test_gradcheck(first_order):
    g = torch.Generator().manual_seed(7)
    d = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    W, A, B = d(4, 6), (d(2, 6) * 0.4).requires_grad_(), (d(4, 2) * 0.4).requires_grad_()
    x = d(3, 6).requires_grad_()
    bias = d(4).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda A_, B_: pk.ops.lie_weight(W, A_, B_, scaling=SCALE, first_order=first_order), (A, B))
    assert torch.autograd.gradcheck(
        lambda x_, A_, B_, b_: pk.ops.lie_linear(x_, W, A_, B_, bias=b_, scaling=SCALE,
                                                 first_order=first_order), (x, A, B, bias))
    Wc, xc = d(4, 2, 2, 3), d(2, 4, 5, 5).requires_grad_()
    Ac = (d(2, 12) * 0.4).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, A_, B_: pk.ops.lie_conv2d(x_, Wc, A_, B_, stride=2, padding=1, groups=2,
                                             scaling=SCALE, first_order=first_order),
        (xc, Ac, B))


def test_opcheck():
    g = torch.Generator().manual_seed(8)
    d = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    W, A, B, x = d(4, 6), d(2, 6).requires_grad_(), d(4, 2).requires_grad_(), d(3, 6).requires_grad_()
    torch.library.opcheck(torch.ops.peft_kernels.lie_weight.default, (W, A, B, 0.5, False))
    torch.library.opcheck(torch.ops.peft_kernels.lie_linear.default, (x, W, A, B, d(4), 0.5, True))
    Wc, xc = d(4, 3, 2, 2), d(2, 3, 5, 5).requires_grad_()
    torch.library.opcheck(torch.ops.peft_kernels.lie_conv2d.default,
                          (xc, Wc, d(2, 12).requires_grad_(), B, None, [1, 1], [1, 0], [1, 1], 1,
                           0.5, False))


def test_compile_fullgraph():
    layer = LieLinear_random(nn.Linear(12, 7), r=3)
    x = torch.randn(5, 12)
    compiled = torch.compile(lambda t: layer(t).square().sum(), fullgraph=True, backend="aot_eager")
    g_c = torch.autograd.grad(compiled(x), [layer.lora_A, layer.lora_B])
    g_e = torch.autograd.grad(layer(x).square().sum(), [layer.lora_A, layer.lora_B])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def LieLinear_random(linear, r, first_order=False, seed=9):
    layer = pk.nn.LieLinear.from_linear(linear, r, first_order=first_order)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return layer


@pytest.mark.parametrize("first_order", [False, True])
def test_layers_start_at_base_and_match_reference(first_order):
    torch.manual_seed(10)
    lin = nn.Linear(16, 6).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    layer = pk.nn.LieLinear.from_linear(lin, 4, first_order=first_order)
    assert torch.equal(layer(x), lin(x))  # B = 0: exp(0) = 1 exactly
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    xc = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    lc = pk.nn.LieConv2d.from_conv(conv, 2, alpha=4.0, first_order=first_order)
    assert torch.equal(lc(xc), conv(xc))
    with torch.no_grad():
        lc.lora_B.normal_(0, 0.3)
    want = R.lie_conv2d(xc, conv.weight, lc.lora_A, lc.lora_B, conv.bias, 2.0, first_order,
                        padding=1)
    assert_close(lc(xc), want, torch.float64, "LieConv2d")


@pytest.mark.parametrize("mode,padding", [("reflect", 1), ("zeros", "same"), ("circular", 2),
                                          ("zeros", "valid")])
def test_conv_padding_modes(mode, padding):
    torch.manual_seed(11)
    conv = nn.Conv2d(4, 6, 3, padding=padding, padding_mode=mode, groups=2).double()
    layer = pk.nn.LieConv2d.from_conv(conv, 2)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(R.lie_weight(conv.weight, layer.lora_A, layer.lora_B, layer.scaling))
    assert_close(layer(x), ref(x), torch.float64, mode)
    assert_close(layer(x[0]), ref(x[0]), torch.float64, "unbatched")


@pytest.mark.parametrize("first_order", [False, True])
def test_merge_unmerge(first_order):
    torch.manual_seed(12)
    lin = nn.Linear(10, 8)
    with torch.no_grad():
        lin.weight[0, :3] = 0.0  # zeros of W stay zero
    W0 = lin.weight.detach().clone()
    layer = LieLinear_random(lin, 3, first_order=first_order)
    x = torch.randn(5, 10)
    y = layer(x)
    layer.merge()
    assert layer.merged and torch.equal(lin.weight[0, :3], torch.zeros(3))
    if not first_order:
        assert torch.equal(torch.sign(lin.weight), torch.sign(W0))  # exp > 0 keeps every sign
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    # Float64 factor, one rounding each way: W within 2 ulp of float32.
    torch.testing.assert_close(lin.weight, W0, rtol=2.4e-7, atol=1e-7)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_unmerge_refuses_a_zero_first_order_factor():
    lin = nn.Linear(3, 2)
    layer = pk.nn.LieLinear.from_linear(lin, 1, alpha=1.0, first_order=True)
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.copy_(torch.tensor([[-1.0], [0.5]]))  # row 0: 1 + s·B A = 0
    layer.merge()
    with pytest.raises(RuntimeError, match="first-order factor 1 \\+ s·B A is zero at 3 entries"):
        layer.unmerge()


@pytest.mark.parametrize("fill", [-11.0, 20.0])
def test_merge_refuses_a_weight_unmerge_could_not_restore(fill):
    # exp(s·B A) = e^-121 (W_eff underflows float32 to zero) or e^400 (overflows): the merged
    # weight would lose W, so merge refuses and leaves the base weight as it was; so does
    # merge_and_unload, before it changes any layer.
    lin = nn.Linear(4, 3)
    layer = pk.nn.LieLinear.from_linear(lin, 1, alpha=1.0)
    with torch.no_grad():
        layer.lora_A.fill_(fill)
        layer.lora_B.fill_(abs(fill))
    W0 = lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="overflows or underflows torch.float32 at 12 entries"):
        layer.merge()
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match="layer '0' cannot be merged"):
        pk.nn.merge_and_unload(model)
    assert not layer.merged and torch.equal(lin.weight, W0) and model[0] is layer


def test_state_dict_round_trip():
    torch.manual_seed(13)
    layer = LieLinear_random(nn.Linear(9, 4), 2, first_order=True)
    other = pk.nn.LieLinear(9, 4, 2)
    other.load_state_dict(layer.state_dict())
    assert other.first_order and other.alpha == layer.alpha
    x = torch.randn(3, 9)
    assert torch.equal(other(x), layer(x))
    conv = pk.nn.LieConv2d.from_conv(nn.Conv2d(2, 3, 3), 2)
    conv.merge()
    conv2 = pk.nn.LieConv2d(nn.Conv2d(2, 3, 3), 2)
    conv2.load_state_dict(conv.state_dict())
    assert conv2.merged
    with pytest.raises(ValueError, match="state has r=2 but this layer has r=3"):
        pk.nn.LieLinear(9, 4, 3).load_state_dict(layer.state_dict())


def test_training_step_moves_only_the_adapter():
    torch.manual_seed(14)
    lin = nn.Linear(8, 8)
    W0 = lin.weight.detach().clone()
    layer = pk.nn.LieLinear.from_linear(lin, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(16, 8), torch.randn(16, 8)
    losses = fit(opt, lambda _: F.mse_loss(layer(x), target), range(20))
    assert losses[-1] < losses[0] and torch.equal(lin.weight, W0)


def test_bad_inputs():
    W, A, B = torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[r, 6\]"):
        pk.ops.lie_weight(W, torch.randn(2, 5), B)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[4, 2\]"):
        pk.ops.lie_weight(W, A, torch.randn(4, 3))
    with pytest.raises(TypeError, match="lora_A has dtype"):
        pk.ops.lie_weight(W, A.double(), B)
    with pytest.raises(TypeError, match="weight must be float32, float64, float16 or bfloat16"):
        pk.ops.lie_weight(W.int(), A.int(), B.int())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        pk.ops.lie_weight(torch.randn(4), A, B)
    with pytest.raises(ValueError, match="weight must be frozen"):
        pk.ops.lie_weight(W.requires_grad_(), A, B)
    W.requires_grad_(False)
    with pytest.raises(ValueError, match="scaling must be finite"):
        pk.ops.lie_weight(W, A, B, scaling=float("nan"))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 6\]"):
        pk.ops.lie_linear(torch.randn(3, 5), W, A, B)
    with pytest.raises(ValueError, match=r"bias must have shape \[4\]"):
        pk.ops.lie_linear(torch.randn(3, 6), W, A, B, bias=torch.randn(3))
    with pytest.raises(ValueError, match="one device"):
        pk.ops.lie_linear(torch.randn(3, 6), W, A.to("meta"), B)
    with pytest.raises(ValueError, match="padding must be an int or a pair"):
        pk.ops.lie_conv2d(torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 1), A, B, padding="same")
    with pytest.raises(ValueError, match=r"weight must have shape \[out, in / groups, kh, kw\]"):
        pk.ops.lie_conv2d(torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3), torch.randn(2, 12),
                          torch.randn(6, 2))
    with pytest.raises(ValueError, match="r must be a positive int"):
        pk.nn.LieLinear.from_linear(nn.Linear(3, 2), 0)
    with pytest.raises(ValueError, match="r must be a positive int, got True"):
        pk.nn.LieLinear.from_linear(nn.Linear(3, 2), True)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        pk.nn.LieLinear.from_linear(nn.Conv2d(3, 2, 1), 2)
    with pytest.raises(TypeError, match="must be an nn.Conv2d"):
        pk.nn.LieConv2d.from_conv(nn.Linear(3, 2), 2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("first_order", [False, True])
def test_cuda_half_types(dtype, first_order):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(4, 37, 96, generator=g).to("cuda", dtype)
    W = (torch.randn(72, 96, generator=g) / 10).to("cuda", dtype)
    A, B = adapters(72, 96, 8, dtype, "cuda")
    compare(lambda *t: pk.ops.lie_linear(*t, scaling=SCALE, first_order=first_order),
            lambda *t: R.lie_linear(*t, None, SCALE, first_order),
            [x, W, A, B], {1}, dtype, None, ["dx", "dA", "dB"])
    conv = torch.randn(16, 8, 3, 3, generator=g).to("cuda", dtype) / 8
    xc = torch.randn(2, 8, 9, 9, generator=g).to("cuda", dtype)
    Ac, Bc = adapters(16, 72, 4, dtype, "cuda")
    compare(lambda *t: pk.ops.lie_conv2d(*t, padding=1, scaling=SCALE, first_order=first_order),
            lambda *t: R.lie_conv2d(*t, None, SCALE, first_order, padding=1),
            [xc, conv, Ac, Bc], {1}, dtype, None, ["dx", "dA", "dB"])
    if dtype == torch.float32:
        return  # float32 at the shape below: test_lie_weight_matches_reference
    # The weight kernels over several row tiles per block (66000 x 40: 2063 row tiles on grids of
    # 2048 x 1 and 1024 x 1 blocks, see test_lie_weight_matches_reference) with the half types'
    # r > 32 gradient variants: dA partials in registers across the tiles (r = 40), dA flushed
    # per tile (r = 70).
    Wt = torch.randn(66000, 40, generator=g).to("cuda", dtype)
    for r in (40, 70):
        At, Bt = adapters(66000, 40, r, dtype, "cuda", seed=r)
        compare(lambda W_, A_, B_: pk.ops.lie_weight(W_, A_, B_, scaling=SCALE,
                                                     first_order=first_order),
                lambda W_, A_, B_: R.lie_weight(W_, A_, B_, SCALE, first_order),
                [Wt, At, Bt], {0}, dtype, None, ["dA", "dB"])


@pytest.mark.cuda
def test_cuda_backward_is_flagged_nondeterministic():
    """The CUDA gradient kernel sums dA and dB with float atomics, so under
    torch.use_deterministic_algorithms(True) its backward raises, as torch's own such ops do."""
    W = torch.randn(16, 24, device="cuda")
    A, B = adapters(16, 24, 4, torch.float32, "cuda")
    A.requires_grad_()
    y = pk.ops.lie_weight(W, A, B, scaling=SCALE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="lie_weight backward"):
            y.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
