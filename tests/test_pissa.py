"""PiSSA initialisation: LoRALinear.from_linear(init="pissa") and pk.nn.pissa_init."""
import copy

import pytest
import torch
from torch import nn

import peft_kernels as pk
from tolerances import assert_close


def reference_pissa(weight, r, scaling):
    """A, B and the residual from torch.linalg.svd in float64, as METHODS §1 writes them."""
    U, S, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = S[:r].sqrt() / scaling**0.5
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root
    return A, B, weight.detach().double() - scaling * B @ A


def align_signs(B, B_ref):
    """Per-triplet signs d (±1, [r]) with B·d ≈ B_ref: an SVD fixes each pair (u_i, v_i) only up
    to a common sign, so A's rows and B's columns may flip together."""
    d = torch.sign((B.double() * B_ref.double()).sum(0))
    assert bool((d != 0).all())
    return d


def assert_same_adapter(layer, A_ref, B_ref, dtype, msg=""):
    d = align_signs(layer.lora_B, B_ref)
    assert_close(layer.lora_B.double() * d, B_ref, dtype, f"{msg} B")
    assert_close(d[:, None] * layer.lora_A.double(), A_ref, dtype, f"{msg} A")


class Model(nn.Module):
    """Two layers of one shape (one group for pissa_init, with different r) and two singletons."""

    def __init__(self, dtype=torch.float64, device="cpu"):
        super().__init__()
        torch.manual_seed(0)
        kw = dict(dtype=dtype, device=device)
        self.inp = nn.Linear(16, 32, **kw)
        self.mid1 = nn.Linear(32, 32, **kw)
        self.mid2 = nn.Linear(32, 32, **kw)
        self.out = nn.Linear(32, 8, bias=False, **kw)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.tanh(self.mid2(torch.relu(self.mid1(h))))
        return self.out(h)


RANKS = {"inp": 4, "mid1": 6, "mid2": 3, "out": 2}


def convert(model, init="kaiming", alpha=None, **kw):
    for name, r in RANKS.items():
        setattr(model, name, pk.nn.LoRALinear.from_linear(getattr(model, name), r, alpha=alpha,
                                                          init=init, **kw))
    return model


@pytest.mark.parametrize("alpha, use_rslora", [(None, False), (8.0, False), (3.0, True)])
def test_from_linear_pissa_matches_the_formulas(alpha, use_rslora):
    torch.manual_seed(1)
    linear = nn.Linear(24, 18, dtype=torch.float64)
    w0 = linear.weight.detach().clone()
    layer = pk.nn.LoRALinear.from_linear(linear, 5, alpha=alpha, init="pissa", use_rslora=use_rslora)
    assert layer.base is linear and not linear.weight.requires_grad
    A_ref, B_ref, residual_ref = reference_pissa(w0, 5, layer.scaling)
    assert_same_adapter(layer, A_ref, B_ref, torch.float64)
    assert_close(layer.base.weight, residual_ref, torch.float64, "residual")
    assert_close(layer.scaling * layer.lora_B @ layer.lora_A, w0 - residual_ref, torch.float64, "s·B A")
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_unchanged_at_initialisation(device, dtype):
    model = Model(dtype, device).eval()
    x = torch.randn(7, 16, dtype=dtype, device=device)
    y0 = model(x)
    convert(model, init="pissa", alpha=16.0, dropout=0.1).eval()
    # float64: the table's 1e-10. float32: the layers are lora_linear outputs in float32, held to
    # the table's 2e-4 like every float32 kernel output; PiSSA adds one rounding of each residual
    # entry (2⁻²⁴·|W| ≈ 1.5e-8 for these weights), ~1e-7 on an O(1) output of 32 terms.
    assert_close(model(x), y0, dtype, "outputs after PiSSA")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pissa_init_on_a_model_equals_per_layer_init(dtype):
    per_layer = convert(Model(dtype), init="pissa", alpha=8.0)
    batched = convert(Model(dtype), alpha=8.0)
    before = {n: m.base.weight.detach().clone() for n, m in batched.named_children()}
    layers = pk.nn.pissa_init(batched)
    assert list(layers) == list(RANKS) and all(layers[n] is getattr(batched, n) for n in RANKS)
    for name in RANKS:
        ref, got = getattr(per_layer, name), getattr(batched, name)
        assert not torch.equal(got.base.weight, before[name])
        assert_same_adapter(got, ref.lora_A.detach(), ref.lora_B.detach(), dtype, name)
        assert_close(got.base.weight, ref.base.weight, dtype, f"{name} residual")


def test_pissa_init_one_batched_call_per_group(monkeypatch):
    calls = []
    svd = pk.ops.truncated_svd

    def spy(A, k, **kw):
        calls.append((tuple(A.shape), A.dtype, k, kw))
        return svd(A, k, **kw)

    monkeypatch.setattr(pk.ops, "truncated_svd", spy)
    model = convert(Model())
    extra = pk.nn.LoRALinear.from_linear(nn.Linear(32, 32, dtype=torch.float32), 2)  # other dtype
    layers = pk.nn.pissa_init([model.inp, model.mid1, model.mid2, model.out, extra], method="auto")
    assert list(layers) == ["0", "1", "2", "3", "4"]
    assert sorted(calls, key=str) == sorted([
        ((1, 32, 16), torch.float64, 4, {"method": "auto"}),
        ((2, 32, 32), torch.float64, 6, {"method": "auto"}),  # mid1 (r 6) and mid2 (r 3)
        ((1, 8, 32), torch.float64, 2, {"method": "auto"}),
        ((1, 32, 32), torch.float32, 2, {"method": "auto"}),
    ], key=str)


def test_pissa_init_slices_large_groups(monkeypatch):
    # Four 32 x 32 float64 weights (8 KiB each) and a 20 KiB slice: two calls of two layers,
    # equal to the one call of four.
    torch.manual_seed(5)
    whole = [pk.nn.LoRALinear.from_linear(nn.Linear(32, 32, dtype=torch.float64), r, alpha=8.0)
             for r in (6, 3, 2, 5)]
    sliced = copy.deepcopy(whole)
    pk.nn.pissa_init(whole)
    calls = []
    svd = pk.ops.truncated_svd

    def spy(A, k, **kw):
        calls.append((tuple(A.shape), k))
        return svd(A, k, **kw)

    monkeypatch.setattr(pk.ops, "truncated_svd", spy)
    monkeypatch.setattr(pk.nn.lora, "PISSA_SLICE_BYTES", 20 * 1024)
    pk.nn.pissa_init(sliced)
    assert calls == [((2, 32, 32), 6), ((2, 32, 32), 6)]
    for ref, got in zip(whole, sliced):
        assert torch.equal(got.lora_A, ref.lora_A) and torch.equal(got.lora_B, ref.lora_B)
        assert torch.equal(got.base.weight, ref.base.weight)


def test_pissa_init_passes_svd_options_and_keeps_outputs_with_a_sketch():
    # The randomized method gives approximate triplets; W_res + s·B A = W holds for any A, B.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(96, 128, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(128, 96, dtype=torch.float64))
    x = torch.randn(5, 96, dtype=torch.float64)
    y0 = model(x)
    for i in (0, 2):
        model[i] = pk.nn.LoRALinear.from_linear(model[i], 4, alpha=8.0)
    layers = pk.nn.pissa_init(model, niter=1, oversample=4, method="randomized")
    assert list(layers) == ["0", "2"]
    assert_close(model(x), y0, torch.float64, "outputs after a randomized PiSSA")
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in layers.values())


@pytest.mark.parametrize("dtype, compute", [(torch.float64, torch.float64),
                                            (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32)])
def test_svd_runs_in_float32_or_wider(monkeypatch, dtype, compute):
    seen = []
    svd = pk.ops.truncated_svd
    monkeypatch.setattr(pk.ops, "truncated_svd", lambda A, k, **kw: seen.append(A.dtype) or svd(A, k, **kw))
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, dtype=dtype)
    w0 = linear.weight.detach().double()
    layer = pk.nn.LoRALinear.from_linear(linear, 4, init="pissa")
    assert seen == [compute] and layer.lora_A.dtype == dtype
    if dtype == torch.bfloat16:  # W_res + s·B A is W up to the bfloat16 roundings of its terms
        assert_close(layer.base.weight.double() + layer.delta_weight().double(), w0, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_after_pissa_gives_back_w(dtype):
    torch.manual_seed(2)
    linear = nn.Linear(40, 24, dtype=dtype)
    w0 = linear.weight.detach().clone()
    layer = pk.nn.LoRALinear.from_linear(linear, 8, alpha=4.0, init="pissa")
    layer.merge()
    # The residual was rounded once when written and the merged sum once more.
    eps = torch.finfo(dtype).eps
    bound = 2 * eps * (w0.abs() + layer.delta_weight().abs().to(dtype)).max().item()
    assert (layer.base.weight - w0).abs().max().item() <= bound


def test_state_dict_round_trip_after_pissa():
    layer = pk.nn.LoRALinear.from_linear(nn.Linear(24, 18, dtype=torch.float64), 4, init="pissa")
    fresh = pk.nn.LoRALinear(24, 18, 4, dtype=torch.float64)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_pissa_trains_like_lora():
    layer = pk.nn.LoRALinear.from_linear(nn.Linear(16, 8, dtype=torch.float64), 4, init="pissa")
    layer(torch.randn(5, 16, dtype=torch.float64)).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


def test_from_linear_refusals_leave_the_linear_untouched():
    linear = nn.Linear(6, 4, dtype=torch.float64)
    w0 = linear.weight.detach().clone()
    with pytest.raises(ValueError, match="PiSSA initialises LoRA only.*activation='gelu'"):
        pk.nn.LoRALinear.from_linear(linear, 2, activation="gelu", init="pissa")
    with pytest.raises(ValueError, match=r"r <= min\(out_features, in_features\) = 4, got r=5"):
        pk.nn.LoRALinear.from_linear(linear, 5, init="pissa")
    with pytest.raises(ValueError, match="positive, finite scaling.*alpha=-2"):
        pk.nn.LoRALinear.from_linear(linear, 2, alpha=-2.0, init="pissa")
    with pytest.raises(ValueError, match="init must be 'kaiming' or 'pissa'"):
        pk.nn.LoRALinear.from_linear(linear, 2, init="PiSSA")
    assert torch.equal(linear.weight, w0) and linear.weight.requires_grad


@pytest.mark.parametrize("first", ["kaiming", "pissa"])
def test_pissa_init_after_training_keeps_the_outputs(first):
    # The adapter's current update is part of the weight PiSSA decomposes: a second call, or one
    # after training, changes the split of W_full between base and adapter, not the outputs.
    model = convert(Model(), init=first)
    with torch.no_grad():
        for name in RANKS:
            getattr(model, name).lora_B.add_(0.3 * torch.randn_like(getattr(model, name).lora_B))
    x = torch.randn(5, 16, dtype=torch.float64)
    want = model(x)
    pk.nn.pissa_init(model)
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    for name, r in RANKS.items():  # and the new adapter is the top-r part of W_full
        layer = getattr(model, name)
        full = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
        A_ref, B_ref, _ = reference_pissa(full, r, layer.scaling)
        assert_same_adapter(layer, A_ref, B_ref, torch.float64, name)


def test_pissa_init_refusals():
    with pytest.raises(ValueError, match="has no LoRALinear layers"):
        pk.nn.pissa_init(Model())
    with pytest.raises(ValueError, match="is empty"):
        pk.nn.pissa_init([])
    with pytest.raises(TypeError, match=r"model_or_layers\[1\] must be a LoRALinear, got Linear"):
        pk.nn.pissa_init([convert(Model()).inp, nn.Linear(3, 3)])
    with pytest.raises(TypeError, match="must be an nn.Module or an iterable of LoRALinear, got int"):
        pk.nn.pissa_init(3)

    # Every layer is checked before any is written.
    model = convert(Model())
    model.mid2 = pk.nn.LoRALinear.from_linear(nn.Linear(32, 32, dtype=torch.float64), 2,
                                              activation="relu")
    with pytest.raises(ValueError, match="layer 'mid2': PiSSA initialises LoRA only"):
        pk.nn.pissa_init(model)
    assert torch.count_nonzero(model.inp.lora_B) == 0

    model = convert(Model())
    model.mid1.merge()
    with pytest.raises(ValueError, match="layer 'mid1'.*merged.*unmerge"):
        pk.nn.pissa_init(model)

    shared = nn.Linear(8, 8, dtype=torch.float64)
    twins = [pk.nn.LoRALinear.from_linear(shared, 2), pk.nn.LoRALinear.from_linear(shared, 2)]
    with pytest.raises(ValueError, match="layer '1' shares its base weight with layer '0'"):
        pk.nn.pissa_init(twins)

    wide_r = pk.nn.LoRALinear.from_linear(nn.Linear(3, 8, dtype=torch.float64), 4)
    with pytest.raises(ValueError, match="r <= min.*= 3, got r=4"):
        pk.nn.pissa_init([wide_r])
