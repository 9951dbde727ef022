"""OrthogonalLinear / OrthogonalConv2d / matrix_exp_orthogonal against the pure-PyTorch OFT-style
computation (reference.oft_rotation: torch.linalg.matrix_exp, dense block diagonal) and torch's
orthogonal parametrization."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_kernels import reference as R
from peft_kernels.nn import OrthogonalConv2d, OrthogonalLinear, matrix_exp_orthogonal
from tolerances import assert_close


def randomise(layer, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.oft_params.copy_(torch.randn(layer.oft_params.shape, generator=g) * scale)
    return layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_linear_matches_oft_reference(dtype, block_size):
    torch.manual_seed(0)
    lin = nn.Linear(24, 10).to(dtype)
    layer = randomise(OrthogonalLinear.from_linear(lin, block_size))
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    gx, gp = torch.autograd.grad(y, [x, layer.oft_params], dy)

    d = lambda t: t.detach().double().requires_grad_()
    xr, pr = d(x), d(layer.oft_params)
    yr = R.oft_linear(xr, lin.weight.double(), lin.bias.double(), pr, block_size)
    gxr, gpr = torch.autograd.grad(yr, [xr, pr], dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(gx, gxr, dtype, "dx")
    assert_close(gp, gpr, dtype, "d params")
    assert layer.oft_params.shape == (24 // block_size, block_size * (block_size - 1) // 2)
    assert lin.weight.grad is None


def test_starts_equal_to_base_and_only_params_train():
    lin = nn.Linear(16, 4)
    layer = OrthogonalLinear.from_linear(lin, 8)
    x = torch.randn(6, 16)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["oft_params"]


def test_merge_unmerge_restores_weight():
    lin = nn.Linear(32, 12)
    w0 = lin.weight.detach().clone()
    layer = randomise(OrthogonalLinear.from_linear(lin, 8), scale=1.0)
    x = torch.randn(4, 32)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y.detach(), torch.float32, "merged output")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    # float32 rounding of W R Rᵀ: a few ulps of |W| ~ 0.2
    torch.testing.assert_close(lin.weight.detach(), w0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_state_dict_round_trip():
    layer = randomise(OrthogonalLinear.from_linear(nn.Linear(16, 3), 4))
    layer.merge()
    other = OrthogonalLinear(16, 3, 4)
    other.load_state_dict(layer.state_dict())
    assert other.merged
    x = torch.randn(2, 16)
    torch.testing.assert_close(other(x), layer(x))
    other.unmerge()
    layer.unmerge()
    torch.testing.assert_close(other(x), layer(x))
    with pytest.raises(ValueError, match="block_size"):
        OrthogonalLinear(16, 3, 8).load_state_dict(layer.state_dict())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_matches_rotated_kernel(dtype):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 6, 3, padding=1, stride=2).to(dtype)
    layer = randomise(OrthogonalConv2d.from_conv(conv, 4))
    x = torch.randn(2, 8, 9, 9, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    gx, gp = torch.autograd.grad(y, [x, layer.oft_params], dy)

    d = lambda t: t.detach().double().requires_grad_()
    xr, pr = d(x), d(layer.oft_params)
    Rd = R.oft_rotation(pr, 4)
    w = torch.einsum("oihw,ij->ojhw", conv.weight.double(), Rd)  # every kernel: W[o,:,h,w] R
    yr = F.conv2d(xr, w, conv.bias.double(), stride=2, padding=1)
    gxr, gpr = torch.autograd.grad(yr, [xr, pr], dy.double())
    assert_close(y, yr, dtype, "y")
    assert_close(gx, gxr, dtype, "dx")
    assert_close(gp, gpr, dtype, "d params")
    w0 = conv.weight.detach().clone()
    layer.merge()
    assert_close(layer(x), yr, dtype, "merged")
    layer.unmerge()
    torch.testing.assert_close(conv.weight.detach(), w0, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)


def test_bad_configurations():
    with pytest.raises(ValueError, match="must divide"):
        OrthogonalLinear.from_linear(nn.Linear(10, 3), 4)
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        OrthogonalLinear.from_linear(nn.Linear(8, 3), 1)
    with pytest.raises(TypeError, match="nn.Linear"):
        OrthogonalLinear.from_linear(nn.Conv2d(8, 3, 1), 4)
    with pytest.raises(ValueError, match="groups=1"):
        OrthogonalConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2), 4)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        OrthogonalConv2d.from_conv(nn.Linear(8, 3), 4)


def test_compile_fullgraph():
    layer = randomise(OrthogonalLinear.from_linear(nn.Linear(16, 8), 4))
    x = torch.randn(5, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    g = layer.oft_params.grad.clone()
    layer.oft_params.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(y, layer(x))
    torch.testing.assert_close(g, layer.oft_params.grad)


def test_conv_compiles_for_a_new_image_size():
    # The second size recompiles with dynamic shapes (inductor): the channel rotation's op takes
    # the image batch itself, so no permuted view of it is saved for backward.
    layer = randomise(OrthogonalConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), 2))
    compiled = torch.compile(layer, fullgraph=True)
    for shape in [(8, 4, 5, 5), (8, 4, 7, 7)]:
        x = torch.randn(*shape)
        y = compiled(x)
        y.sum().backward()
        g = layer.oft_params.grad
        layer.oft_params.grad = None
        layer(x).sum().backward()
        torch.testing.assert_close(y, layer(x))
        torch.testing.assert_close(g, layer.oft_params.grad)
        layer.oft_params.grad = None


@pytest.mark.parametrize("shape", [(6, 6), (4, 6), (6, 4), (3, 5, 5)])
def test_matrix_exp_orthogonal_matches_torch_parametrization(shape):
    torch.manual_seed(2)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(shape, dtype=torch.float64))

    ours, theirs = Holder(), None
    theirs = copy.deepcopy(ours)
    matrix_exp_orthogonal(ours, "weight")
    torch.nn.utils.parametrizations.orthogonal(theirs, "weight", orthogonal_map="matrix_exp")
    # Same free parameters and the same base on both sides (the base completion is random).
    with torch.no_grad():
        X = torch.randn(theirs.parametrizations.weight.original.shape, dtype=torch.float64) * 0.5
        ours.parametrizations.weight.original.copy_(X)
        theirs.parametrizations.weight.original.copy_(X)
        ours.parametrizations.weight[0].base.copy_(theirs.parametrizations.weight[0].base)
    W, Wt = ours.weight, theirs.weight
    torch.testing.assert_close(W, Wt, rtol=1e-12, atol=1e-12)
    cols = W if shape[-2] >= shape[-1] else W.mT
    eye = torch.eye(cols.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(cols.mT @ cols, eye.expand_as(cols.mT @ cols), rtol=0, atol=1e-12)
    G = torch.randn(shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(W, ours.parametrizations.weight.original, G)
    (gt,) = torch.autograd.grad(Wt, theirs.parametrizations.weight.original, G)
    torch.testing.assert_close(g, gt, rtol=1e-10, atol=1e-12)


def test_matrix_exp_orthogonal_starts_at_orthogonal_weight_and_accepts_assignment():
    m = nn.Linear(5, 5, bias=False).double()
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    with torch.no_grad():
        m.weight.copy_(Q)
    matrix_exp_orthogonal(m)
    torch.testing.assert_close(m.weight, Q, rtol=0, atol=1e-14)
    Q2, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    m.weight = Q2
    torch.testing.assert_close(m.weight, Q2, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="no tensor 'missing'"):
        matrix_exp_orthogonal(nn.Embedding(3, 4), "missing")
    with pytest.raises(ValueError, match="floating tensor with >= 2 dims"):
        matrix_exp_orthogonal(nn.Linear(3, 4), "bias")
