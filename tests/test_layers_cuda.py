"""Every adapter layer on CUDA, in every dtype the CUDA kernels take: forward and backward
against the same module in float64 on the CPU on the same (rounded) values, under
torch.autocast too, and merge / unmerge and a state_dict moved between devices. Dropout is
off here: each device draws its mask seed from its own generator, so the two devices' masks
differ for one torch.manual_seed (the masks' equality for one seed is test_lora_linear's)."""
import copy

import pytest
import torch

import peft_kernels as pk
from layer_table import LAYERS, forward_backward, randomise_trainable
from tolerances import assert_close

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_layer(name):
    torch.manual_seed(0)
    make, make_input = LAYERS[name]
    layer = make()
    randomise_trainable(layer)
    for m in layer.modules():
        if isinstance(m, pk.nn.LoRALinear):
            m.dropout = 0.0
    return layer, make_input


def output_gradient(reference, x):
    with torch.no_grad():
        y = reference(x.double())
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_on_cuda_matches_cpu_float64(name, dtype):
    layer, make_input = make_layer(name)
    layer = layer.to(dtype)
    reference = copy.deepcopy(layer).double()
    x = make_input(dtype)
    dy = output_gradient(reference, x).to(dtype)
    y, dx, grads = forward_backward(copy.deepcopy(layer).cuda(), x.cuda(), dy.cuda())
    y64, dx64, grads64 = forward_backward(reference, x.double(), dy.double())
    assert y.is_cuda and y.dtype == dtype and dx.dtype == dtype
    assert_close(y, y64, dtype, f"{name} output")
    assert_close(dx, dx64, dtype, f"{name} dx")
    assert grads.keys() == grads64.keys() and grads
    for n in grads:
        assert grads[n].is_cuda and grads[n].dtype == dtype, n
        assert_close(grads[n], grads64[n], dtype, f"{name} grad of {n}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_under_cuda_autocast(name, dtype):
    """A float32 layer inside torch.autocast("cuda"): it computes on the region's dtype, as
    F.linear / F.conv2d do there, and its float32 parameters get float32 gradients equal to the
    float64 module's on the values rounded to that dtype."""
    layer, make_input = make_layer(name)
    reference = copy.deepcopy(layer).to(dtype).double()
    x = make_input(torch.float32)
    dy = output_gradient(reference, x.to(dtype)).to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        y, dx, grads = forward_backward(copy.deepcopy(layer).cuda(), x.cuda(), dy.cuda())
    y64, dx64, grads64 = forward_backward(reference, x.to(dtype).double(), dy.double())
    assert y.dtype == dtype and dx.dtype == torch.float32
    assert_close(y, y64, dtype, f"{name} output")
    assert_close(dx, dx64, dtype, f"{name} dx")
    for n in grads:
        assert grads[n].dtype == torch.float32, n
        assert_close(grads[n], grads64[n], dtype, f"{name} grad of {n}")


@pytest.mark.parametrize("name", list(LAYERS))
def test_merge_unmerge_and_state_dict_across_devices(name):
    """float64 on CUDA: merge gives the unmerged outputs, unmerge gives back the base weight
    (to float64 rounding), and a state_dict saved on CUDA loads into a fresh CPU layer with the
    same outputs."""
    layer, make_input = make_layer(name)
    layer = layer.double().cuda().eval()
    x = make_input(torch.float64).cuda()
    tol = dict(rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        want = layer(x)
        base_before = {k: v.clone() for k, v in layer.state_dict().items()
                       if k.startswith("base.")}
        if getattr(layer, "activation", None) is not None:  # not linear in x
            with pytest.raises(RuntimeError, match="cannot be folded"):
                layer.merge()
        else:
            layer.merge()
            torch.testing.assert_close(layer(x), want, **tol)
            layer.unmerge()
            for k, v in base_before.items():
                torch.testing.assert_close(layer.state_dict()[k], v, **tol)
        torch.testing.assert_close(layer(x), want, **tol)
        fresh, _ = make_layer(name)
        fresh = fresh.double()
        fresh.load_state_dict(layer.state_dict())  # CUDA tensors into a CPU module
        torch.testing.assert_close(fresh.eval()(x.cpu()), want.cpu(), **tol)
