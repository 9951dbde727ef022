"""pk.nn.LoRALinear: equals the HF-PEFT-style layer, merge/unmerge, state_dict, compile, training."""
import math

import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels import reference as R
from tolerances import assert_close
from training import fit, trainable


class HFStyleLoRA(nn.Module):
    """What HF PEFT's LoRA Linear computes: base(x) + lora_B(lora_A(dropout(x))) * scaling."""

    def __init__(self, base, lora_A, lora_B, scaling, activation=None):
        super().__init__()
        self.base, self.scaling, self.act = base, scaling, activation
        kw = dict(bias=False, dtype=lora_A.dtype, device=lora_A.device)
        self.lora_A = nn.Linear(base.in_features, lora_A.shape[0], **kw)
        self.lora_B = nn.Linear(lora_A.shape[0], base.out_features, **kw)
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_A)
            self.lora_B.weight.copy_(lora_B)

    def forward(self, x, keep_mask=None, p=0.0):
        dropped = x if keep_mask is None else x * keep_mask.to(x.dtype) / (1 - p)
        h = self.lora_A(dropped)
        h = {None: h, "relu": torch.relu(h), "gelu": nn.functional.gelu(h), "silu": nn.functional.silu(h)}[self.act]
        return self.base(x) + self.lora_B(h) * self.scaling


def make_layer(in_f=24, out_f=18, r=4, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(device, dtype)
    layer = pk.nn.LoRALinear.from_linear(base, r, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained-looking B, so the adapter branch matters
    return layer


def test_from_linear_shares_and_freezes_base_and_starts_at_base(device):
    base = nn.Linear(16, 8).to(device, torch.float64)
    layer = pk.nn.LoRALinear.from_linear(base, r=4, alpha=8)
    assert layer.base is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.scaling == 2.0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    x = torch.randn(5, 16, dtype=torch.float64, device=device)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-14)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_scaling_rules():
    assert make_layer(r=4).scaling == 1.0  # alpha defaults to r
    assert make_layer(r=4, alpha=16).scaling == 4.0
    assert make_layer(r=4, alpha=16, use_rslora=True).scaling == 8.0


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_equals_hf_style_layer_same_mask(device, activation, dropout):
    layer = make_layer(device=device, dropout=dropout, activation=activation, alpha=6)
    hf = HFStyleLoRA(layer.base, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling, activation)
    x = torch.randn(3, 7, 24, dtype=torch.float64, device=device, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)  # replay the layer's seed draw to rebuild its mask
    seed = int(pk.ops.draw_dropout_seed(device).item())
    mask = R.dropout_keep_mask(seed, 21, 24, dropout).view(3, 7, 24).to(device) if dropout else None
    x_ref = x.detach().clone().requires_grad_()
    y_ref = hf(x_ref, mask, dropout)
    assert_close(y, y_ref, torch.float64, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(x.grad, x_ref.grad, torch.float64, "dx")
    assert_close(layer.lora_A.grad, hf.lora_A.weight.grad, torch.float64, "dA")
    assert_close(layer.lora_B.grad, hf.lora_B.weight.grad, torch.float64, "dB")


def test_eval_mode_disables_dropout():
    layer = make_layer(dropout=0.5).eval()
    x = torch.randn(10, 24, dtype=torch.float64)
    assert torch.equal(layer(x), layer(x))
    hf = HFStyleLoRA(layer.base, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
    assert_close(layer(x), hf(x), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_unmerge(device, dtype):
    layer = make_layer(dtype=dtype, device=device, alpha=8)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(6, 24, dtype=dtype, device=device)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y, dtype, "merged output")
    assert_close(layer.base.weight, w0 + layer.delta_weight().to(dtype), dtype, "merged weight")
    layer.unmerge()
    # Restored to within the rounding of adding and subtracting the update once each.
    eps = torch.finfo(dtype).eps
    bound = 2 * eps * (w0.abs() + layer.delta_weight().abs().to(dtype)).max().item()
    assert (layer.base.weight - w0).abs().max().item() <= bound
    assert_close(layer(x), y, dtype, "unmerged output")


def test_merge_refusals():
    with pytest.raises(RuntimeError, match="activation='relu'.*cannot be folded"):
        make_layer(activation="relu").merge()
    layer = make_layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


@pytest.mark.parametrize("merged", [False, True])
def test_state_dict_round_trip(merged):
    layer = make_layer(alpha=12, dropout=0.1, use_rslora=True)
    if merged:
        layer.merge()
    sd = layer.state_dict()
    assert set(sd) == {"base.weight", "base.bias", "lora_A", "lora_B", "_extra_state"}
    fresh = pk.nn.LoRALinear(24, 18, 4, dtype=torch.float64)
    fresh.load_state_dict(sd)
    assert fresh.merged == merged and fresh.scaling == layer.scaling and fresh.dropout == 0.1
    x = torch.randn(4, 24, dtype=torch.float64)
    layer.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    if merged:
        fresh.unmerge()
        layer.unmerge()
        torch.testing.assert_close(fresh.base.weight, layer.base.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="r=4 but this layer has r=5"):
        pk.nn.LoRALinear(24, 18, 5, dtype=torch.float64).load_state_dict(sd)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="r must be a positive int"):
        pk.nn.LoRALinear.from_linear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="r must be a positive int, got True"):
        pk.nn.LoRALinear.from_linear(nn.Linear(4, 4), r=True)
    with pytest.raises(ValueError, match="dropout must be in"):
        pk.nn.LoRALinear.from_linear(nn.Linear(4, 4), r=2, dropout=1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        pk.nn.LoRALinear.from_linear(nn.Linear(4, 4), r=2, activation="tanh")
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        pk.nn.LoRALinear.from_linear(nn.Conv1d(4, 4, 1), r=2)
    with pytest.raises(ValueError, match="init must be"):
        pk.nn.LoRALinear.from_linear(nn.Linear(4, 4), r=2, init="gaussian")


class TinyModel(nn.Module):
    def __init__(self, dropout=0.0, activation=None):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = pk.nn.LoRALinear.from_linear(nn.Linear(16, 32), 4, dropout=dropout, activation=activation)
        self.l2 = pk.nn.LoRALinear.from_linear(nn.Linear(32, 8), 2, dropout=dropout)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compile_fullgraph_aot_eager(dropout):
    model = TinyModel(dropout=dropout, activation="gelu")
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in trainable(model)]
    model.zero_grad()
    torch.manual_seed(1)
    ref = model(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, trainable(model)):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.slow
def test_compile_inductor_smoke():
    model = TinyModel().eval()
    x = torch.randn(3, 16)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_training_reduces_loss():
    # The target comes from the same frozen bases with other adapters, so it is reachable.
    teacher = TinyModel()
    with torch.no_grad():
        for layer in (teacher.l1, teacher.l2):
            layer.lora_B.normal_(std=0.5)
    model = TinyModel(dropout=0.1)
    x = torch.randn(256, 16)
    target = teacher(x).detach()
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    losses = fit(opt, lambda _: nn.functional.mse_loss(model(x), target), range(60))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert model.l1.base.weight.grad is None  # frozen base never receives a gradient
