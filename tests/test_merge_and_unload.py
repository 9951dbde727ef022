"""pk.nn.merge_and_unload: a model with every adapter layer, trained away from its
initialisation, against the same model before unloading (float64: the merge rounds each weight
once)."""
import copy

import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels.nn.convert import ADAPTER_LAYERS

TOL = dict(rtol=1e-12, atol=1e-12)  # float64 weights rounded once each; measured 1.4e-16


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        kw = dict(dtype=torch.float64)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, **kw)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, **kw)
        self.body = nn.Sequential(nn.Linear(128, 64, **kw), nn.GELU(), nn.Linear(64, 64, **kw),
                                  nn.Tanh(), nn.Linear(64, 48, **kw), nn.Linear(48, 48, **kw))
        self.head = nn.Linear(48, 10, **kw)
        self.extra = nn.Linear(10, 10, **kw)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.extra(self.head(self.body(h)))


def adapted(net: Net) -> Net:
    net.conv1 = pk.nn.LieConv2d.from_conv(net.conv1, 2)
    net.conv2 = pk.nn.OrthogonalConv2d.from_conv(net.conv2, block_size=4)
    net.body[0] = pk.nn.LoRALinear.from_linear(net.body[0], 4, alpha=8.0)
    net.body[2] = pk.nn.SparseDeltaLinear.from_linear(net.body[2], torch.tensor([0, 7, 100, 4095]))
    net.body[4] = pk.nn.SVDNodeLinear.from_linear(net.body[4], 5)
    net.body[5] = pk.nn.OrthogonalLinear.from_linear(net.body[5], block_size=8)
    net.head = pk.nn.LieLinear.from_linear(net.head, 3, first_order=True)
    net.extra = pk.nn.LoRALinear.from_linear(net.extra, 2, init="pissa")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move every trainable parameter away from its initialisation
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def test_outputs_modules_and_state_dict_keys(device):
    torch.manual_seed(0)
    plain = Net()
    keys = list(plain.state_dict())
    net = adapted(copy.deepcopy(plain)).to(device)
    net.body[2].merge()  # an already merged layer is unloaded as it is
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64).to(device)
    with torch.no_grad():
        want = net(x)
        got_model = pk.nn.merge_and_unload(net)
        got = got_model(x)
    assert got_model is net
    assert not any(isinstance(m, ADAPTER_LAYERS) for m in net.modules())
    assert [type(m) for m in net.modules()] == [type(m) for m in plain.modules()]
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(want.cpu(), plain(x.cpu()))  # the adapters did change the function


def test_an_adapter_layer_itself_returns_its_base():
    linear = nn.Linear(12, 6, dtype=torch.float64)
    layer = pk.nn.LieLinear.from_linear(linear, 2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x)
        base = pk.nn.merge_and_unload(layer)
        assert base is linear
        torch.testing.assert_close(base(x), want, **TOL)


def test_unmergeable_adapter_raises_and_leaves_the_model_untouched():
    net = adapted(Net())
    net.body[3] = pk.nn.LoRALinear.from_linear(nn.Linear(64, 48, dtype=torch.float64), 2,
                                               activation="relu")
    net.body[4] = nn.Identity()
    before = copy.deepcopy(net.state_dict())
    types = [type(m) for m in net.modules()]
    with pytest.raises(ValueError, match=r"layer 'body.3' cannot be merged.*activation='relu'"):
        pk.nn.merge_and_unload(net)
    assert [type(m) for m in net.modules()] == types
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))
    assert not any(getattr(m, "merged", False) for m in net.modules())


def test_bad_model():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pk.nn.merge_and_unload("model")


# ------------------------------------------------------------------------------ inject_adapters


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        kw = dict(dtype=torch.float64)
        self.q, self.qk, self.v = nn.Linear(16, 16, **kw), nn.Linear(16, 16, **kw), nn.Linear(16, 16, **kw)
        self.mlp = nn.Sequential(nn.Linear(16, 32, **kw), nn.ReLU(), nn.Linear(32, 16, **kw))

    def forward(self, x):
        return self.mlp(self.q(x) * torch.sigmoid(self.qk(x)) + self.v(x))


def blocks(n=2):
    torch.manual_seed(1)
    return nn.Sequential(*[Block() for _ in range(n)])


def lora(m):
    return pk.nn.LoRALinear.from_linear(m, 2)


def test_inject_by_name_freezes_the_rest_and_keeps_outputs():
    model = blocks()
    x = torch.randn(4, 16, dtype=torch.float64)
    want = model(x)
    new = pk.nn.inject_adapters(model, ["q", "v"], lora)
    assert sorted(new) == ["0.q", "0.v", "1.q", "1.v"]
    assert all(model.get_submodule(name) is layer for name, layer in new.items())
    assert isinstance(model[0].qk, nn.Linear) and not isinstance(model[0].qk, pk.nn.LoRALinear)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{b}.{t}.lora_{m}" for b in "01" for t in "qv" for m in "AB")
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-15)  # B = 0 at initialisation


def test_inject_by_callable_outer_match_wins_and_freeze_off():
    model = blocks(1)
    chosen = pk.nn.inject_adapters(model, lambda name, m: name == "0.mlp" or isinstance(m, nn.Linear),
                                   lambda m: m if isinstance(m, nn.Linear) else nn.Sequential(m),
                                   freeze=False)
    # 0.mlp is chosen, so its two Linears are not considered on their own.
    assert sorted(chosen) == ["0.mlp", "0.q", "0.qk", "0.v"]
    assert isinstance(model[0].mlp, nn.Sequential) and model[0].mlp[0] is chosen["0.mlp"][0]
    assert all(p.requires_grad for p in model.parameters())


def test_inject_then_merge_and_unload_round_trip():
    model = blocks()
    pk.nn.inject_adapters(model, "v", lambda m: pk.nn.LieLinear.from_linear(m, 2))
    for layer in model.modules():
        if isinstance(layer, pk.nn.LieLinear):
            nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        got = pk.nn.merge_and_unload(model)(x)
    torch.testing.assert_close(got, want, **TOL)
    assert type(model[0].v) is nn.Linear


@pytest.mark.parametrize("targets,make,exc,text", [
    (["nothing"], lora, ValueError, "matched no submodule"),
    ([], lora, TypeError, "targets must be"),
    ([3], lora, TypeError, "targets must be"),
    (3, lora, TypeError, "targets must be"),
    ("q", "not callable", TypeError, "make must be callable"),
    ("q", lambda m: 1.0, TypeError, "make returned float for '0.q'"),
])
def test_inject_bad_inputs_leave_the_model_untouched(targets, make, exc, text):
    model = blocks()
    types = [type(m) for m in model.modules()]
    with pytest.raises(exc, match=text):
        pk.nn.inject_adapters(model, targets, make)
    assert [type(m) for m in model.modules()] == types
    assert all(p.requires_grad for p in model.parameters())


def test_a_shared_module_gets_one_adapter_and_unloads_everywhere():
    model = blocks(2)
    model[1].v = model[0].v  # one Linear under two parents
    new = pk.nn.inject_adapters(model, "v", lora)
    assert sorted(new) == ["0.v", "1.v"] and new["0.v"] is new["1.v"] is model[1].v
    nn.init.normal_(new["0.v"].lora_B)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        pk.nn.merge_and_unload(model)
    assert type(model[0].v) is nn.Linear and model[0].v is model[1].v
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, **TOL)


@pytest.mark.parametrize("make", [
    lambda m: pk.nn.LoRALinear.from_linear(m, 4 if m.out_features == 16 else 40, init="pissa"),
    lambda m: pk.nn.SVDNodeLinear.from_linear(m, 4 if m.out_features == 16 else 40),
])
def test_a_failing_make_gives_the_model_back(make):
    # The first targets' PiSSA / SVD-node builds moved part of W into their adapters before the
    # last target (16 -> 32, r = 40 > 16) failed: that part goes back, and so do the flags.
    model = blocks(1)
    x = torch.randn(3, 16, dtype=torch.float64)
    want = model(x)
    with pytest.raises(ValueError, match="r"):
        pk.nn.inject_adapters(model, ["q", "v", "mlp.0"], make)
    assert all(type(m) is not pk.nn.LoRALinear and type(m) is not pk.nn.SVDNodeLinear
               for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), want, **TOL)


def test_inject_keeps_what_the_new_layers_train():
    # An SVD-node layer trains its base's bias, which the old module shared until the swap.
    model = blocks(1)
    pk.nn.inject_adapters(model, "q", lambda m: pk.nn.SVDNodeLinear.from_linear(m, 2))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.q.A", "0.q.B", "0.q.base.bias"]


def test_inject_refuses_a_module_inside_an_adapter():
    model = blocks(1)
    pk.nn.inject_adapters(model, "q", lora)
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"'0.q.base', which is inside the adapter layer '0.q'"):
        pk.nn.inject_adapters(model, lambda name, m: isinstance(m, nn.Linear), lora)
    assert [type(m) for m in model.modules()] == types
