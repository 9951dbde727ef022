"""Zero-sized dimensions through the Linear-shaped ops: no tokens, no input features, no output
features. torch's own nn.Linear accepts all three (y is the bias, or empty), so the ops must too,
forward and backward, against the same reference.py functions as the other tests."""
import pytest
import torch
import torch.nn.functional as F

import peft_kernels as pk
from peft_kernels import reference as R
from tolerances import assert_close

# (N, in, out): no tokens; no input features (y = bias); no output features.
SHAPES = [(0, 6, 5), (3, 0, 5), (3, 6, 0)]


def _lora(N, in_f, out_f, device, dtype):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)
    x, w, A, B, b = t(N, in_f), t(out_f, in_f), t(2, in_f), t(out_f, 2), t(out_f)
    return (lambda x, A, B, b: pk.ops.lora_linear(x, w, A, B, scaling=1.5, bias=b),
            lambda x, A, B, b: R.lora_linear(x, w, A, B, scaling=1.5, bias=b), (x, A, B, b))


def _sparse(N, in_f, out_f, device, dtype):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)
    k = min(3, in_f * out_f)
    idx = torch.arange(k, device=device)
    x, w, v, b = t(N, in_f), t(out_f, in_f), t(k), t(out_f)
    return (lambda x, v, b: pk.ops.sparse_delta_linear(x, w, idx, v, bias=b),
            lambda x, v, b: R.sparse_delta_linear(x, w, idx, v, bias=b), (x, v, b))


def _lie(N, in_f, out_f, device, dtype):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)
    x, w, A, B, b = t(N, in_f), t(out_f, in_f), t(2, in_f), t(out_f, 2), t(out_f)
    return (lambda x, A, B, b: pk.ops.lie_linear(x, w, A, B, bias=b, scaling=0.5),
            lambda x, A, B, b: R.lie_linear(x, w, A, B, b, 0.5), (x, A, B, b))


def _rotated(N, in_f, out_f, device, dtype):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)
    blocks = in_f // 3
    x, w, b = t(N, in_f), t(out_f, in_f), t(out_f)
    rot = torch.linalg.qr(t(blocks, 3, 3))[0]
    dense = lambda r: torch.block_diag(*r) if blocks else torch.zeros(0, 0, dtype=dtype, device=device)
    return (lambda x, r, b: pk.ops.rotated_linear(x, w, r, b),
            lambda x, r, b: F.linear(x, w @ dense(r), b), (x, rot, b))


@pytest.mark.parametrize("make", [_lora, _sparse, _lie, _rotated],
                         ids=["lora_linear", "sparse_delta_linear", "lie_linear", "rotated_linear"])
@pytest.mark.parametrize("shape", SHAPES, ids=["N=0", "in=0", "out=0"])
def test_zero_sized_dimension(device, make, shape):
    dtype = torch.float64
    kernel, reference, inputs = make(*shape, device, dtype)
    got_in = [t.clone().requires_grad_() for t in inputs]
    ref_in = [t.detach().cpu().clone().requires_grad_() for t in inputs]
    y, yr = kernel(*got_in), reference(*ref_in)
    assert y.shape == yr.shape
    assert_close(y, yr, dtype, "y")
    dy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = torch.autograd.grad(y, got_in, dy.to(device), allow_unused=True)
    want = torch.autograd.grad(yr, ref_in, dy, allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.zeros_like(inputs[i]) if g is None else g
        w = torch.zeros_like(ref_in[i]) if w is None else w
        assert g.shape == w.shape, i
        assert_close(g, w, dtype, f"grad of input {i}")


LAYERS = {
    "LoRALinear": lambda lin: pk.nn.LoRALinear.from_linear(lin, r=2),
    "SparseDeltaLinear": lambda lin: pk.nn.SparseDeltaLinear.from_mask(
        lin, torch.ones_like(lin.weight, dtype=torch.bool)),
    "LieLinear": lambda lin: pk.nn.LieLinear.from_linear(lin, r=2),
    "OrthogonalLinear": lambda lin: pk.nn.OrthogonalLinear.from_linear(lin, block_size=4),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("in_f,out_f", [(0, 5), (8, 0)])
def test_layers_on_empty_linear(layer, in_f, out_f):
    """from_linear of a Linear with no inputs or no outputs: the base's output, a backward."""
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f, dtype=torch.float64)
    with torch.no_grad():
        base.bias.normal_()
    module = LAYERS[layer](base)
    x = torch.randn(3, in_f, dtype=torch.float64)
    y = module(x)
    torch.testing.assert_close(y, F.linear(x, base.weight, base.bias), rtol=0, atol=0)
    y.sum().backward()
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.shape == p.shape, name
