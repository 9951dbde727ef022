"""float16 / bfloat16 on the CPU: every layer and op computes in float32 (inputs converted per
call, results rounded back) and matches the same module in float64 on the same, already rounded,
values within the half type's tolerance; mismatched dtypes still fail with the op's message.
Under torch.autocast every layer takes the region's dtype, float32 parameters beside it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_kernels as pk
from layer_table import LAYERS, forward_backward, randomise_trainable
from tolerances import assert_close

HALF_TYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_in_half_precision_matches_float64(name, dtype):
    torch.manual_seed(0)
    make, make_input = LAYERS[name]
    layer = make()
    randomise_trainable(layer)
    layer = layer.to(dtype)
    reference = copy.deepcopy(layer).double()  # the same rounded values, in float64
    x = make_input(dtype)
    with torch.no_grad():
        dy = torch.randn_like(layer(x), dtype=torch.float64).to(dtype)
    y, dx, grads = forward_backward(layer, x, dy)
    y64, dx64, grads64 = forward_backward(reference, x.double(), dy.double())
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, y64, dtype, f"{name} output")
    assert_close(dx, dx64, dtype, f"{name} dx")
    assert grads.keys() == grads64.keys() and grads
    for n in grads:
        assert grads[n].dtype == dtype, n
        assert_close(grads[n], grads64[n], dtype, f"{name} grad of {n}")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_under_autocast_matches_float64(name, dtype):
    """float32 layer and input inside torch.autocast: the layer computes on the autocast dtype
    (as F.linear / F.conv2d there), its output has that dtype, and the float32 gradients of the
    input and the parameters are those of the same module in float64 on values rounded to it.
    The float32 input is also fed through a Linear first: the layer then receives the autocast
    dtype beside its float32 parameters, which the ops alone would refuse."""
    torch.manual_seed(0)
    make, make_input = LAYERS[name]
    layer = make()
    randomise_trainable(layer)
    reference = copy.deepcopy(layer).to(dtype).double()
    x = make_input(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        dy = torch.randn_like(layer(x), dtype=torch.float64).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        y, dx, grads = forward_backward(layer, x, dy)
        y_after_cast, _, _ = forward_backward(copy.deepcopy(layer), x.to(dtype), dy)
    y64, dx64, grads64 = forward_backward(reference, x.to(dtype).double(), dy.double())
    assert y.dtype == dtype and dx.dtype == torch.float32
    assert_close(y, y64, dtype, f"{name} output")
    assert_close(y_after_cast, y64, dtype, f"{name} output from a {dtype} input")
    assert_close(dx, dx64, dtype, f"{name} dx")
    assert grads.keys() == grads64.keys() and grads
    for n in grads:
        assert grads[n].dtype == torch.float32, n
        assert_close(grads[n], grads64[n], dtype, f"{name} grad of {n}")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_float32_adapter_on_half_base(name, dtype):
    """Trainable parameters upcast to float32 on a half-precision base (float32 master weights,
    as PEFT training scripts do): the layer computes in the base's dtype and gives the same
    output as the all-half layer, with float32 gradients equal to its gradients."""
    torch.manual_seed(0)
    make, make_input = LAYERS[name]
    half = make()
    randomise_trainable(half)
    half = half.to(dtype)
    mixed = copy.deepcopy(half)
    for p in mixed.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    x = make_input(dtype)
    with torch.no_grad():
        dy = torch.randn_like(half(x), dtype=torch.float64).to(dtype)
    y, dx, grads = forward_backward(half, x, dy)
    y_mixed, dx_mixed, grads_mixed = forward_backward(mixed, x, dy)
    assert y_mixed.dtype == dtype
    assert_close(y_mixed, y, dtype, f"{name} output")
    assert_close(dx_mixed, dx, dtype, f"{name} dx")
    for n in grads:
        assert grads_mixed[n].dtype == torch.float32, n
        assert_close(grads_mixed[n], grads[n], dtype, f"{name} grad of {n}")


def test_compiled_under_autocast():
    """torch.compile traces the same autocast handling (fullgraph: no graph break)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(),
                          pk.nn.LoRALinear.from_linear(nn.Linear(32, 8), r=4))
    randomise_trainable(model[2])
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_eager = compiled(x), model(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_expm_and_truncated_svd_in_half_precision(dtype):
    g = torch.Generator().manual_seed(3)
    A = (torch.randn(4, 6, 6, generator=g) / 3).to(dtype).requires_grad_()
    G = torch.randn(4, 6, 6, generator=g).to(dtype)
    E = pk.ops.expm(A)
    (dA,) = torch.autograd.grad(E, A, G)
    A64 = A.detach().double().requires_grad_()
    E64 = torch.linalg.matrix_exp(A64)
    (dA64,) = torch.autograd.grad(E64, A64, G.double())
    assert E.dtype == dA.dtype == dtype
    assert_close(E, E64, dtype, "expm")
    assert_close(dA, dA64, dtype, "expm gradient")

    M = torch.randn(3, 10, 7, generator=g).to(dtype)
    U, S, Vh = pk.ops.truncated_svd(M, 4)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert_close(S, torch.linalg.svdvals(M.double())[:, :4], dtype, "singular values")
    assert_close(U.mT.double() @ U.double(), torch.eye(4).expand(3, 4, 4), dtype, "U orthonormal")


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_mixed_dtypes_still_rejected(dtype):
    x = torch.randn(3, 8, dtype=dtype)
    W, A, B = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)  # float32
    with pytest.raises(TypeError, match="x has dtype .* but another floating-point argument"):
        pk.ops.lora_linear(x, W, A, B)
    with pytest.raises(TypeError, match="weight has dtype .* but another floating-point argument"):
        pk.ops.lie_weight(W.to(dtype), A, B)
    with pytest.raises(TypeError, match="weight has dtype .* but x has dtype Float; they must match"):
        pk.ops.lora_linear(x.float(), W.to(dtype), A, B)
    with pytest.raises(TypeError, match="x has dtype .* but another floating-point argument"):
        pk.ops.sparse_delta_linear(x, W, torch.tensor([0, 3]), torch.randn(2))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_opcheck_in_half_precision(dtype):
    """The fake kernels' dtypes hold for the converted calls (the LoRA forward's rank-r
    activations stay float32, everything else comes back in the half type)."""
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(6, 8, generator=g).to(dtype), torch.randn(5, 8, generator=g).to(dtype)
    A = torch.randn(3, 8, generator=g).to(dtype).requires_grad_()
    B = torch.randn(5, 3, generator=g).to(dtype).requires_grad_()
    ops = torch.ops.peft_kernels
    torch.library.opcheck(ops.lora_linear_fwd.default, (x, W, A, B, None, None, 0.5, 0.0, 0))
    torch.library.opcheck(ops.lie_linear.default, (x, W, A, B, None, 0.5, False))
    torch.library.opcheck(ops.expm_fwd.default, (torch.randn(2, 4, 4, generator=g).to(dtype),))
