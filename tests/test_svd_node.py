"""pk.nn.SVDNodeLinear: W = W_res + A B over the top-r SVD, freeze_nodes, state_dict, compile."""
import copy

import pytest
import torch
from torch import nn

import peft_kernels as pk
from tolerances import assert_close
from training import fit, trainable


def make_linear(in_f=24, out_f=18, bias=True, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)


def make_layer(r=6, **kw):
    train_bias = kw.pop("train_bias", True)
    linear = make_linear(**kw)
    original = copy.deepcopy(linear)
    return pk.nn.SVDNodeLinear.from_linear(linear, r, train_bias=train_bias), original


def test_from_linear_splits_w_by_its_svd():
    layer, original = make_layer(r=6)
    w0 = original.weight.detach()
    assert layer.base.weight.shape == (18, 24) and layer.A.shape == (18, 6) and layer.B.shape == (6, 24)
    assert layer.rank == 6 and layer.num_nodes == 7 and layer.train_bias
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
    d = torch.sign((layer.A.detach() * U[:, :6]).sum(0))  # each (u_i, v_i) is fixed up to a sign
    assert_close(layer.A * d, U[:, :6], torch.float64, "A = U_r")
    assert_close(d[:, None] * layer.B, S[:6, None] * Vh[:6], torch.float64, "B = Σ_r V_rᵀ")
    assert_close(layer.base.weight, w0 - layer.A @ layer.B, torch.float64, "W_res")
    # The residual holds the smaller singular values only.
    assert_close(torch.linalg.matrix_norm(layer.base.weight, ord=2), S[6], torch.float64)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_equal_the_original_linear(device, dtype, bias):
    layer, original = make_layer(r=5, dtype=dtype, device=device, bias=bias)
    x = torch.randn(3, 4, 24, dtype=dtype, device=device)
    # float32: a lora_linear output held to the table's 2e-4, plus one rounding of each W_res
    # entry (~1e-8 each here): the same budget as the LoRA layer.
    assert_close(layer(x), original(x), dtype, "y at init")


def test_positional_rank_and_default():
    assert pk.nn.SVDNodeLinear.from_linear(make_linear(), 3).rank == 3
    assert pk.nn.SVDNodeLinear.from_linear(make_linear()).rank == 10  # METHODS §4: r = 10
    assert pk.nn.SVDNodeLinear(24, 18, 4, dtype=torch.float64).rank == 4


@pytest.mark.parametrize("train_bias", [True, False])
def test_gradients_flow_to_a_b_and_the_trainable_bias_only(train_bias):
    layer, _ = make_layer(r=4, train_bias=train_bias)
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == ({"base.bias", "A", "B"} if train_bias else {"A", "B"})
    assert layer.num_nodes == 4 + train_bias
    x = torch.randn(9, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    # The same function in plain autograd.
    A, B, b = (t.detach().clone().requires_grad_() for t in (layer.A, layer.B, layer.base.bias))
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ layer.base.weight.T + (x_ref @ B.T) @ A.T + b
    y_ref.backward(dy)
    assert_close(y, y_ref, torch.float64, "y")
    assert_close(x.grad, x_ref.grad, torch.float64, "dx")
    assert_close(layer.A.grad, A.grad, torch.float64, "dA")
    assert_close(layer.B.grad, B.grad, torch.float64, "dB")
    assert layer.base.weight.grad is None
    if train_bias:
        assert_close(layer.base.bias.grad, b.grad, torch.float64, "dbias")
    else:
        assert layer.base.bias.grad is None


MASK_1_4 = [False, True, False, False, True, False, False]  # 6 components + the bias


@pytest.mark.parametrize("nodes", [[1, 4], torch.tensor([4, 1]), MASK_1_4])
def test_freeze_nodes_keeps_outputs_and_shrinks_the_rank(nodes):
    layer, original = make_layer(r=6)
    A0, B0, w_res0 = layer.A.detach().clone(), layer.B.detach().clone(), layer.base.weight.detach().clone()
    x = torch.randn(5, 24, dtype=torch.float64)
    layer.freeze_nodes(nodes)
    assert layer.rank == 4 and layer.num_nodes == 5
    keep = [0, 2, 3, 5]
    assert torch.equal(layer.A, A0[:, keep]) and torch.equal(layer.B, B0[keep])
    assert_close(layer.base.weight, w_res0 + A0[:, [1, 4]] @ B0[[1, 4]], torch.float64, "W_res")
    assert_close(layer(x), original(x), torch.float64, "y after freezing")
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"base.bias", "A", "B"}


def test_freeze_the_bias_node_and_every_component():
    layer, original = make_layer(r=3)
    x = torch.randn(5, 24, dtype=torch.float64)
    bias0 = layer.base.bias.detach().clone()
    layer.freeze_nodes(3)  # node `rank` is the bias
    assert not layer.train_bias and not layer.base.bias.requires_grad and layer.num_nodes == 3
    assert torch.equal(layer.base.bias, bias0) and layer.rank == 3
    layer.freeze_nodes(torch.ones(3, dtype=torch.bool))
    assert layer.rank == 0 and layer.num_nodes == 0 and layer.A.shape == (18, 0)
    assert_close(layer(x), original(x), torch.float64, "rank 0")
    assert_close(layer.base.weight, original.weight, torch.float64, "everything folded back")
    layer.freeze_nodes([])  # nothing left to freeze: a no-op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_unmerge(dtype):
    layer, original = make_layer(r=5, dtype=dtype)
    w_res = layer.base.weight.detach().clone()
    x = torch.randn(6, 24, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y, dtype, "merged output")
    # W_res was rounded once when written and the merged sum once more.
    eps = torch.finfo(dtype).eps
    bound = 2 * eps * (original.weight.abs() + layer.low_rank_weight().abs().to(dtype)).max().item()
    assert (layer.base.weight - original.weight).abs().max().item() <= bound
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="merged; unmerge"):
        layer.freeze_nodes([0])
    layer.unmerge()
    assert (layer.base.weight - w_res).abs().max().item() <= bound
    assert_close(layer(x), y, dtype, "unmerged output")
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("freeze", [None, [0, 2, 6], [0, 1, 3, 4, 5]])
@pytest.mark.parametrize("merged", [False, True])
def test_state_dict_round_trip(freeze, merged):
    layer, original = make_layer(r=6)
    with torch.no_grad():
        layer.A.add_(0.1 * torch.randn_like(layer.A))  # a trained-looking layer
        layer.base.bias.add_(1.0)
    if freeze is not None:
        layer.freeze_nodes(freeze)
    if merged:
        layer.merge()
    sd = layer.state_dict()
    assert set(sd) == {"base.weight", "base.bias", "A", "B", "_extra_state"}
    # A fresh layer from the same linear, as when resuming: A and B take the checkpoint's rank.
    fresh = pk.nn.SVDNodeLinear.from_linear(copy.deepcopy(original), 6)
    fresh.load_state_dict(sd)
    assert (fresh.rank, fresh.num_nodes, fresh.merged) == (layer.rank, layer.num_nodes, merged)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
        [n for n, p in layer.named_parameters() if p.requires_grad]
    x = torch.randn(4, 24, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    # A bias-less layer cannot take a trainable bias.
    if layer.train_bias:
        with pytest.raises(ValueError, match="trainable bias but this layer has no bias"):
            pk.nn.SVDNodeLinear.from_linear(make_linear(bias=False), 6).load_state_dict(sd, strict=False)


def test_state_dict_refuses_mismatched_shapes():
    layer, _ = make_layer(r=6)
    sd = layer.state_dict()
    sd["B"] = sd["B"][:5]  # rank 6 in A, 5 in B
    with pytest.raises(RuntimeError, match="size mismatch for B"):
        pk.nn.SVDNodeLinear.from_linear(make_linear(), 6).load_state_dict(sd)


def test_bad_arguments():
    for r in (0, -1, 19, 2.5, True, "4"):
        with pytest.raises(ValueError, match=r"r must be an int in \[1, min\(out_features, "
                                             r"in_features\)\] = \[1, 18\]"):
            pk.nn.SVDNodeLinear.from_linear(make_linear(), r)
    with pytest.raises(ValueError, match=r"= \[1, 3\], got 4"):
        pk.nn.SVDNodeLinear(3, 8, 4)
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        pk.nn.SVDNodeLinear.from_linear(nn.Conv1d(4, 4, 1), 2)

    layer, _ = make_layer(r=4)  # nodes 0..3 components, 4 the bias
    cases = [
        ([5], ValueError, r"must lie in \[0, num_nodes\) = \[0, 5\), got \[5\]"),
        ([-1], ValueError, r"must lie in \[0, num_nodes\)"),
        ([1, 1], ValueError, "must be unique"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer indices or a bool mask"),
        (torch.zeros(2, 2, dtype=torch.long), ValueError, "must be 1-D"),
        ([True, False], ValueError, r"one entry per trainable node \(5\), got 2"),
        ("abc", TypeError, "nodes must be"),
        (True, TypeError, "got a bool"),
    ]
    for nodes, error, message in cases:
        with pytest.raises(error, match=message):
            layer.freeze_nodes(nodes)
    assert layer.rank == 4 and layer.num_nodes == 5  # nothing was frozen by a refused call


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = pk.nn.SVDNodeLinear.from_linear(nn.Linear(16, 32), 4)
        self.l2 = pk.nn.SVDNodeLinear.from_linear(nn.Linear(32, 8), 3, train_bias=False)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@pytest.mark.parametrize("freeze", [False, True])
def test_compile_fullgraph_aot_eager(freeze):
    model = TinyModel()
    if freeze:
        model.l1.freeze_nodes([0, 4])
        model.l2.freeze_nodes([0, 1, 2])  # rank 0: the plain linear path
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    params = [p for p in trainable(model) if p.numel() > 0]
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    ref = model(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad)


def test_training_reduces_loss():
    torch.manual_seed(3)
    teacher = nn.Linear(16, 8)
    model = pk.nn.SVDNodeLinear.from_linear(nn.Linear(16, 8), 4)
    x = torch.randn(256, 16)
    target = teacher(x).detach()
    opt = torch.optim.AdamW(trainable(model), lr=2e-2)
    losses = fit(opt, lambda _: nn.functional.mse_loss(model(x), target), range(60))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
