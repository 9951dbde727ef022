"""pk.nn.SparseDeltaLinear: equality with the pure-PyTorch sparse fine-tuning layer, trainable
state, merge/unmerge, state_dict, compile, bad arguments."""
import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels import reference as R


def make_layer(in_f=45, out_f=67, density=0.02, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_f, out_f).to(device=device, dtype=dtype)
    mask = torch.rand(out_f, in_f, generator=g) < density
    layer = pk.nn.SparseDeltaLinear.from_mask(linear, mask.to(device))
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.values.shape, generator=g).to(device, dtype) * 0.1)
    return layer, mask


def test_equals_base_at_construction(device):
    linear = nn.Linear(45, 67).to(device)
    layer = pk.nn.SparseDeltaLinear.from_linear(linear, torch.tensor([5, 3, 900], device=device))
    x = torch.randn(8, 45, device=device)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)
    assert layer.indices.tolist() == [3, 5, 900]  # sorted
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["values"]


@pytest.mark.parametrize("lead", [(30,), (4, 70)])
def test_matches_reference_and_trains_values_only(device, lead):
    layer, _ = make_layer(dtype=torch.float64, device=device)
    x = torch.randn(*lead, 45, dtype=torch.float64, device=device)
    y = layer(x)
    v = layer.values.detach().clone().requires_grad_()
    yr = R.sparse_delta_linear(x, layer.base.weight, layer.indices, v, layer.base.bias)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    (gr,) = torch.autograd.grad(yr.square().sum(), v)
    torch.testing.assert_close(layer.values.grad, gr, rtol=1e-10, atol=1e-10)
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_from_mask_positions():
    layer, mask = make_layer()
    assert torch.equal(layer.indices, mask.reshape(-1).nonzero().squeeze(1))
    delta = layer.delta_weight()
    assert torch.equal(delta != 0, mask)


def test_merge_unmerge(device):
    layer, _ = make_layer(device=device)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(16, 45, device=device)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=2e-6, atol=2e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    # Each of the k weights is restored to within one float32 rounding of w + v - v.
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=2 * 2.0**-24 * (1 + w0.abs().max().item()))
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_state_dict_round_trip_and_resize():
    layer, _ = make_layer(seed=1)
    other = pk.nn.SparseDeltaLinear.from_linear(nn.Linear(45, 67), torch.tensor([0, 1]))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.indices, layer.indices) and torch.equal(other.values, layer.values)
    x = torch.randn(5, 45)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    assert set(layer.state_dict()) == {"base.weight", "base.bias", "indices", "values", "_extra_state"}
    layer.merge()
    again = pk.nn.SparseDeltaLinear.from_linear(nn.Linear(45, 67), layer.indices)
    again.load_state_dict(layer.state_dict())
    assert again.merged


def test_load_state_dict_checks_indices_of_the_same_count():
    layer, _ = make_layer(seed=1)
    state = layer.state_dict()
    k = layer.indices.numel()
    for bad, text in [(state["indices"].flip(0), "sorted"),
                      (torch.arange(k) + 45 * 67 - 1, r"\[0, 3015\)")]:
        other, _ = make_layer(seed=1)
        with pytest.raises(ValueError, match=text):
            other.load_state_dict({**state, "indices": bad})


def test_compile_fullgraph():
    layer, _ = make_layer()
    x = torch.randn(12, 45)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    y.sum().backward()
    assert layer.values.grad is not None


def test_bad_arguments():
    linear = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        pk.nn.SparseDeltaLinear.from_linear(nn.Conv2d(1, 1, 1), torch.tensor([0]))
    with pytest.raises(ValueError, match="unique"):
        pk.nn.SparseDeltaLinear.from_linear(linear, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        pk.nn.SparseDeltaLinear.from_linear(linear, torch.tensor([12]))
    with pytest.raises(TypeError, match="int64 or int32"):
        pk.nn.SparseDeltaLinear.from_linear(linear, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        pk.nn.SparseDeltaLinear.from_mask(linear, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        pk.nn.SparseDeltaLinear.from_mask(linear, torch.ones(3, 4))


def test_regrow_drops_smallest_and_grows_largest_scores(device):
    layer, _ = make_layer(device=device)
    k = layer.values.numel()
    with torch.no_grad():
        layer.values.copy_(torch.linspace(-1, 1, k, device=device))  # |value| smallest mid-range
    old_idx, old_val = layer.indices.clone(), layer.values.detach().clone()
    scores = torch.rand(layer.base.weight.shape, generator=torch.Generator().manual_seed(3)).to(device)
    n = round(0.25 * k)
    grown_pos = layer.regrow(scores, fraction=0.25)
    assert layer.values.numel() == k and layer.indices.numel() == k
    assert torch.equal(layer.indices, torch.sort(layer.indices).values)
    assert torch.unique(layer.indices).numel() == k
    # The kept entries are the k - n of largest |value|, with their values.
    kept_ref = old_idx[torch.sort(old_val.abs(), stable=True).indices[n:]]
    new_map = dict(zip(layer.indices.tolist(), layer.values.detach().tolist()))
    for i, v in zip(old_idx.tolist(), old_val.tolist()):
        if i in set(kept_ref.tolist()):
            assert new_map[i] == v
    # The grown ones are the n best-scored positions outside the kept set, starting at zero.
    cand = scores.reshape(-1).double().clone()
    cand[kept_ref] = -float("inf")
    want = set(torch.topk(cand, n).indices.tolist())
    assert set(layer.indices[grown_pos].tolist()) == want
    assert (layer.values.detach()[grown_pos] == 0).all()
    # The layer still computes x (W + Δ)ᵀ + b for its new entries.
    x = torch.randn(5, layer.in_features, device=device)
    expected = R.sparse_delta_linear(x, layer.base.weight, layer.indices, layer.values.detach(),
                                     layer.base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=2e-4, atol=2e-4)


def test_regrow_bad_arguments():
    layer, _ = make_layer()
    good = torch.rand(layer.base.weight.shape)
    with pytest.raises(ValueError, match="fraction"):
        layer.regrow(good, fraction=1.5)
    with pytest.raises(ValueError, match="shape"):
        layer.regrow(good[:3])
    with pytest.raises(TypeError, match="scores"):
        layer.regrow(good.long())
    with pytest.raises(ValueError, match="finite"):
        layer.regrow(torch.full_like(good, float("nan")))
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        layer.regrow(good)
