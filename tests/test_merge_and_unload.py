"""pk.nn.merge_and_unload: a model with every adapter layer, trained away from its
initialisation, against the same model before unloading (float64: the merge rounds each weight
once)."""
import copy

import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels.nn.unload import ADAPTER_LAYERS

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


def test_outputs_modules_and_state_dict_keys():
    torch.manual_seed(0)
    plain = Net()
    keys = list(plain.state_dict())
    net = adapted(copy.deepcopy(plain))
    net.body[2].merge()  # an already merged layer is unloaded as it is
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
        got_model = pk.nn.merge_and_unload(net)
        got = got_model(x)
    assert got_model is net
    assert not any(isinstance(m, ADAPTER_LAYERS) for m in net.modules())
    assert [type(m) for m in net.modules()] == [type(m) for m in plain.modules()]
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(want, plain(x))  # the adapters did change the function


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
