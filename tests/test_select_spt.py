"""SPT selection: sensitivity scores, budget allocation, plan application, end-to-end tuning."""
import copy

import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels.nn import LoRALinear
from peft_kernels.nn.sparse import SparseDeltaLinear
from peft_kernels.select import SPTPlan, apply_plan, sensitivity, spt_plan
from training import fit, trainable


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# sensitivity
# ----------------------------------------------------------------------------------------------

def tiny_mlp(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.5), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3),
    ).to(dtype)


def make_batches(n, size=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 5, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_sensitivity_matches_autograd_reference(device):
    model = tiny_mlp().eval().to(device)  # eval: dropout off, so the reference sees the same function
    batches = [tuple(t.to(device) for t in batch) for batch in make_batches(3)]
    scores = sensitivity(model, batches, ce_loss, progress=False)
    # Default targets: every Linear but the last one (the head).
    assert list(scores) == ["0", "3"]

    weights = [model[0].weight, model[3].weight]
    expected = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        grads = torch.autograd.grad(ce_loss(model, batch), weights)
        for e, g in zip(expected, grads):
            e += g.square()
    for name, e in zip(["0", "3"], expected):
        assert scores[name].shape == e.shape
        assert scores[name].dtype == torch.float64 and scores[name].device == e.device
        torch.testing.assert_close(scores[name], e, rtol=1e-12, atol=1e-15)
        assert e.abs().max() > 1e-6  # the comparison is not between zeros


def test_sensitivity_float32_scores_and_explicit_targets():
    model = tiny_mlp(torch.float32).eval()
    batches = make_batches(2, dtype=torch.float32)
    scores = sensitivity(model, batches, ce_loss, targets=["5", "0"], progress=False)
    assert list(scores) == ["5", "0"]
    head = model[5].weight
    expected = sum(torch.autograd.grad(ce_loss(model, b), head)[0].square() for b in batches)
    assert scores["5"].dtype == torch.float32
    torch.testing.assert_close(scores["5"], expected, rtol=1e-5, atol=1e-9)
    assert list(sensitivity(model, batches, ce_loss, exclude=[], progress=False)) == ["0", "3", "5"]
    assert list(sensitivity(model, batches, ce_loss, exclude=["0"], progress=False)) == ["3", "5"]


def test_sensitivity_tied_weights():
    # Two modules sharing one weight: each score is the square of the weight's total gradient.
    torch.manual_seed(0)
    a, b, head = nn.Linear(4, 4, dtype=torch.float64), nn.Linear(4, 4, dtype=torch.float64), nn.Linear(4, 2, dtype=torch.float64)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), head)
    batches = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]

    def loss_fn(m, x):
        return m(x).square().mean()

    scores = sensitivity(model, batches, loss_fn, targets=["0", "2"], progress=False)
    expected = sum(torch.autograd.grad(loss_fn(model, x), a.weight)[0].square() for x in batches)
    torch.testing.assert_close(scores["0"], expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(scores["2"], expected, rtol=1e-12, atol=1e-15)
    assert a.weight.grad is None


def test_sensitivity_restores_model_state():
    model = tiny_mlp()
    model[0].bias.requires_grad_(False)
    model[5].weight.requires_grad_(False)
    old_grad = torch.full_like(model[3].weight, 7.0)
    model[3].weight.grad = old_grad
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]

    def flipping_loss(m, batch):
        m.train()  # a loss_fn that changes modes must not leave them changed
        m.eval()
        m[2].train(False)
        return ce_loss(m, batch)

    sensitivity(model, make_batches(2), flipping_loss, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model[3].weight.grad is old_grad and torch.equal(old_grad, torch.full_like(old_grad, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "3.weight")
    assert not any(m.training for m in model.modules())

    model.train()
    sensitivity(model, make_batches(2), flipping_loss, progress=False)
    assert all(m.training for m in model.modules())


def test_sensitivity_uses_current_mode():
    # In train mode dropout is active, so scores differ from eval mode's (same batches).
    model = tiny_mlp()
    batches = make_batches(2)
    torch.manual_seed(3)
    s_train = sensitivity(model.train(), batches, ce_loss, progress=False)
    s_eval = sensitivity(model.eval(), batches, ce_loss, progress=False)
    assert not torch.allclose(s_train["3"], s_eval["3"])


def test_sensitivity_state_restored_on_error():
    model = tiny_mlp()
    flags = [p.requires_grad for p in model.parameters()]

    def bad_loss(m, batch):
        return m(batch[0])  # not a scalar

    with pytest.raises(ValueError, match="scalar"):
        sensitivity(model, make_batches(1), bad_loss, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_sensitivity_progress_line(capsys):
    sensitivity(tiny_mlp(), make_batches(2), ce_loss)
    err = capsys.readouterr().err
    assert "\rsensitivity: 1/2 batches" in err and "\rsensitivity: 2/2 batches" in err
    sensitivity(tiny_mlp(), iter(make_batches(2)), ce_loss)  # no len(): count only
    assert "\rsensitivity: 2 batches" in capsys.readouterr().err
    sensitivity(tiny_mlp(), make_batches(2), ce_loss, progress=False)
    assert capsys.readouterr().err == ""


def test_sensitivity_bad_arguments():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="batches"):
        sensitivity(model, [], ce_loss, progress=False)
    with pytest.raises(TypeError, match="targets.*Tanh"):
        sensitivity(model, make_batches(1), ce_loss, targets=["1"], progress=False)
    with pytest.raises(ValueError, match="targets.*nope"):
        sensitivity(model, make_batches(1), ce_loss, targets=["nope"], progress=False)
    with pytest.raises(ValueError, match="targets is empty"):
        sensitivity(model, make_batches(1), ce_loss, targets=[], progress=False)
    with pytest.raises(ValueError, match="exclude"):
        sensitivity(model, make_batches(1), ce_loss, exclude=["1"], progress=False)
    with pytest.raises(ValueError, match="not both"):
        sensitivity(model, make_batches(1), ce_loss, targets=["0"], exclude=["3"], progress=False)
    with pytest.raises(TypeError, match="loss_fn"):
        sensitivity(model, make_batches(1), None, progress=False)
    with pytest.raises(TypeError, match="model"):
        sensitivity(lambda x: x, make_batches(1), ce_loss, progress=False)
    with pytest.raises(ValueError, match="does not depend"):
        sensitivity(model, make_batches(1), lambda m, b: m[5](torch.ones(1, 6, dtype=torch.float64)).sum(),
                    progress=False)
    with pytest.raises(ValueError, match="no candidate"):
        sensitivity(nn.Linear(3, 3), [torch.randn(2, 3)], lambda m, x: m(x).sum(), progress=False)


# ----------------------------------------------------------------------------------------------
# spt_plan
# ----------------------------------------------------------------------------------------------

def reference_curve(scores, r, alpha):
    """Independent SPT count for every cut τ: rank (score desc, module order, row-major index)."""
    names = list(scores)
    items = sorted((-v, mi, j) for mi, n in enumerate(names) for j, v in enumerate(scores[n].reshape(-1).tolist()))
    p = [r * (scores[n].shape[0] + scores[n].shape[1]) for n in names]
    sig = [0] * len(names)
    curve = [0]
    for _, mi, _ in items:
        sig[mi] += 1
        curve.append(sum(pm if s >= pm / alpha else s for s, pm in zip(sig, p)))
    return items, p, curve


def check_plan_against_reference(plan, scores, r, alpha, structured):
    items, p, curve = reference_curve(scores, r, alpha)
    names = list(scores)
    tau = plan.tau
    assert curve[tau] == plan.total <= plan.budget
    assert tau == len(items) or curve[tau + 1] > plan.budget
    kept = {n: [] for n in names}
    for _, mi, j in items[:tau]:
        kept[names[mi]].append(j)
    assert [e.name for e in plan.entries] == names
    for e, n, pm in zip(plan.entries, names, p):
        s = len(kept[n])
        assert e.sensitive == s and e.shape == tuple(scores[n].shape)
        if s == 0:
            assert (e.kind, e.trainable, e.indices) == ("none", 0, None)
        elif s >= pm / alpha:
            assert (e.kind, e.trainable, e.indices) == (structured, pm, None)
        else:
            assert (e.kind, e.trainable) == ("sparse", s)
            assert e.indices.dtype == torch.int64
            assert e.indices.tolist() == sorted(kept[n])
    return curve


def hand_scores():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(10, 10, generator=g) * 0.5
    b = torch.rand(10, 6, generator=g) * 0.5
    a.view(-1)[[3, 17, 42, 58, 99]] = torch.tensor([100.0, 99.0, 98.0, 97.0, 96.0])
    b.view(-1)[[44, 5, 20]] = torch.tensor([95.0, 94.0, 93.0])
    return {"blocks.0.a": a, "blocks.0.b": b}


@pytest.mark.parametrize("structured", ["lora", "adapter"])
def test_spt_plan_known_answer(structured):
    # r = 2, alpha = 10: P_a = 2 (10 + 10) = 40 (structured from 4 entries on),
    # P_b = 2 (10 + 6) = 32 (from 3.2, i.e. 4 entries on).
    scores = hand_scores()
    plan = spt_plan(scores, 42, r=2, alpha=10.0, structured=structured)
    a, b = plan.entries
    assert (a.kind, a.sensitive, a.trainable, a.indices) == (structured, 5, 40, None)
    assert (b.kind, b.sensitive, b.trainable) == ("sparse", 2, 2)
    assert b.indices.tolist() == [5, 44]
    assert (plan.total, plan.tau, plan.budget) == (42, 7, 42)  # entry 8 (b's third) would make 43

    plan = spt_plan(scores, 41, r=2, alpha=10.0, structured=structured)
    assert (plan.tau, plan.total, plan["blocks.0.b"].indices.tolist()) == (6, 41, [44])

    # 39 cannot hold a's structured block (40): only a's top 3 entries, sparse. The count falls
    # short of the budget by less than one structured block.
    plan = spt_plan(scores, 39, r=2, alpha=10.0, structured=structured)
    assert (plan.tau, plan.total) == (3, 3)
    assert plan["blocks.0.a"].kind == "sparse" and plan["blocks.0.a"].indices.tolist() == [3, 17, 42]
    assert plan["blocks.0.b"].kind == "none"
    assert plan.budget - plan.total < 40


@pytest.mark.parametrize("structured", ["lora", "adapter"])
@pytest.mark.parametrize("r,alpha", [(1, 10.0), (2, 4.0), (3, 1.0), (3, 25.0)])
def test_spt_plan_against_reference(structured, r, alpha):
    g = torch.Generator().manual_seed(r * 100 + int(alpha))
    shapes = {"l0": (6, 5), "l1": (4, 9), "l2": (8, 8), "l3": (3, 3)}
    heat = {"l0": 1.0, "l1": 0.2, "l2": 3.0, "l3": 0.5}
    scores = {n: torch.rand(s, generator=g) ** 3 * heat[n] for n, s in shapes.items()}
    total = sum(s.numel() for s in scores.values())
    kinds = set()
    for budget in [1, 2, 5, 17, 30, 45, 80, 131, total]:
        plan = spt_plan(scores, budget, r=r, alpha=alpha, structured=structured)
        curve = check_plan_against_reference(plan, scores, r, alpha, structured)
        # alpha >= 1: the count never falls as τ grows, so the plan's count is the best one.
        assert plan.total == max(c for c in curve if c <= budget)
        kinds |= {e.kind for e in plan.entries}
    assert kinds == {structured, "sparse", "none"}  # the sweep exercised every branch


def test_spt_plan_alpha_below_one():
    # alpha < 1: a matrix turns structured only when that is cheaper than its σ entries, so the
    # count may fall as τ grows; the plan still sits at a cut within budget whose next entry is not.
    g = torch.Generator().manual_seed(5)
    scores = {"a": torch.rand(4, 4, generator=g), "b": torch.rand(5, 3, generator=g)}
    for budget in range(1, 32):
        plan = spt_plan(scores, budget, r=1, alpha=0.5)
        check_plan_against_reference(plan, scores, 1, 0.5, "lora")


def test_spt_plan_ties_are_deterministic():
    scores = {"a": torch.ones(3, 4), "b": torch.ones(2, 2)}
    plan = spt_plan(scores, 5, r=8)
    assert plan["a"].indices.tolist() == [0, 1, 2, 3, 4] and plan["b"].kind == "none"
    again = spt_plan({"a": torch.ones(3, 4), "b": torch.ones(2, 2)}, 5, r=8)
    assert [(e.name, e.kind, e.sensitive, e.trainable) for e in plan.entries] == \
        [(e.name, e.kind, e.sensitive, e.trainable) for e in again.entries]
    assert torch.equal(plan["a"].indices, again["a"].indices)
    # Module order breaks ties between modules: b first now. Its 4th entry would make it
    # structured (4 >= 32 / 10, 32 params > 5), so the cut stops at 3.
    plan = spt_plan({"b": torch.ones(2, 2), "a": torch.ones(3, 4)}, 5, r=8)
    assert plan["b"].indices.tolist() == [0, 1, 2] and plan["a"].kind == "none" and plan.total == 3


def test_spt_plan_mixed_dtypes_and_budget_bounds():
    scores = {"a": torch.rand(3, 3, dtype=torch.float64), "b": torch.rand(2, 3)}
    plan = spt_plan(scores, 15, r=1, alpha=1.0)
    check_plan_against_reference(plan, scores, 1, 1.0, "lora")
    assert plan.tau == 15


def test_spt_plan_table():
    plan = spt_plan(hand_scores(), 42, r=2)
    text = str(plan)
    assert text == plan.table()
    lines = text.splitlines()
    for name in ["blocks.0.a", "blocks.0.b"]:
        assert any(line.startswith(name) for line in lines)
    assert any(line.startswith("total") and line.split()[-1] == "42" for line in lines)
    assert "10x10" in text and "sparse" in text and "lora" in text and "budget 42" in text
    rows = [line for line in lines if line.startswith("blocks.")]
    assert len({len(row) for row in rows}) == 1  # right-aligned counts: equal row lengths


def test_spt_plan_bad_arguments():
    s = hand_scores()
    n = 160
    for budget in [0, -3, n + 1]:
        with pytest.raises(ValueError, match="budget"):
            spt_plan(s, budget)
    spt_plan(s, n)  # the largest allowed budget
    for budget in [2.5, True, "10"]:
        with pytest.raises(TypeError, match="budget"):
            spt_plan(s, budget)
    with pytest.raises(ValueError, match="r must"):
        spt_plan(s, 10, r=0)
    with pytest.raises(TypeError, match="r must"):
        spt_plan(s, 10, r=2.0)
    for alpha in [0.0, -1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="alpha"):
            spt_plan(s, 10, alpha=alpha)
    with pytest.raises(ValueError, match="structured"):
        spt_plan(s, 10, structured="prefix")
    with pytest.raises(ValueError, match="scores is empty"):
        spt_plan({}, 10)
    bad = dict(s)
    bad["blocks.0.b"] = s["blocks.0.b"].clone()
    bad["blocks.0.b"][1, 2] = float("nan")
    with pytest.raises(ValueError, match="blocks.0.b.*NaN"):
        spt_plan(bad, 10)
    with pytest.raises(ValueError, match="scores\\['v'\\]"):
        spt_plan({"v": torch.rand(4)}, 2)
    with pytest.raises(TypeError, match="scores"):
        spt_plan({"v": torch.ones(2, 2, dtype=torch.int64)}, 2)
    with pytest.raises(TypeError, match="scores"):
        spt_plan([torch.rand(2, 2)], 2)


# ----------------------------------------------------------------------------------------------
# apply_plan and end to end
# ----------------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, d_in=16, width=48, d_out=4):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(d_in, width), nn.Linear(width, width)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        for lin in self.blocks:
            x = torch.tanh(lin(x))
        return self.head(self.norm(x))


@pytest.mark.parametrize("structured", ["lora", "adapter"])
def test_apply_plan_swaps_and_freezes(structured):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(8, 16)
    before = model(x).detach()
    # blocks.0 (48x16): one hot entry -> sparse; blocks.1 (48x48): a hot row -> structured.
    s0 = torch.zeros(48, 16)
    s0[7, 3] = 5.0
    s1 = torch.zeros(48, 48)
    s1[2] = 10.0
    # Ranked: s1's row (48 entries; structured from 38.4 on, 4 (48 + 48) = 384 params), then
    # s0's hot entry (1 param); the next entry (a zero of s0) would exceed the budget.
    plan = spt_plan({"blocks.0": s0, "blocks.1": s1}, 385, r=4, structured=structured)
    assert [e.kind for e in plan.entries] == ["sparse", structured]
    assert plan.total == 1 + 4 * 96

    out = apply_plan(model, plan)
    assert out is model
    assert isinstance(model.blocks[0], SparseDeltaLinear)
    assert model.blocks[0].indices.tolist() == [7 * 16 + 3]
    lora = model.blocks[1]
    assert isinstance(lora, LoRALinear) and lora.r == 4
    assert lora.activation == (None if structured == "lora" else "relu")
    assert trainable_count(model) == plan.total
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)  # equal to the base at init

    # Only the new parameters get gradients.
    model(x).square().sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"blocks.0.values", "blocks.1.lora_A", "blocks.1.lora_B"}


def test_apply_plan_train_head_and_errors():
    torch.manual_seed(0)
    scores = {"blocks.0": torch.rand(48, 16), "blocks.1": torch.rand(48, 48)}
    plan = spt_plan(scores, 300, r=4)
    model = apply_plan(MLP(), plan, train_head=True)
    assert trainable_count(model) == plan.total + 48 * 4 + 4
    assert model.head.weight.requires_grad and not model.norm.weight.requires_grad

    with pytest.raises(ValueError, match="blocks.7"):
        apply_plan(MLP(), spt_plan({"blocks.7": torch.rand(48, 48)}, 10, r=4))
    with pytest.raises(ValueError, match="shape"):
        apply_plan(MLP(), spt_plan({"blocks.1": torch.rand(48, 40)}, 10, r=4))
    with pytest.raises(TypeError, match="nn.Linear"):
        apply_plan(MLP(), spt_plan({"norm": torch.rand(48, 48)}, 10, r=4))
    with pytest.raises(ValueError, match="head"):
        apply_plan(MLP(), spt_plan({"head": torch.rand(4, 48)}, 10, r=1), train_head=True)
    with pytest.raises(TypeError, match="plan"):
        apply_plan(MLP(), {"blocks.0": torch.rand(48, 16)})
    # A failed apply leaves the model untouched.
    model = MLP()
    s0 = torch.zeros(48, 16)
    s0[0, 0] = 3.0
    bad = spt_plan({"blocks.0": s0, "blocks.1": torch.rand(48, 40) + 1}, 20, r=4)
    assert [e.kind for e in bad.entries] == ["sparse", "sparse"]
    with pytest.raises(ValueError):
        apply_plan(model, bad)
    assert isinstance(model.blocks[0], nn.Linear) and trainable_count(model) == sum(
        p.numel() for p in model.parameters())


def test_frozen_bases_inside_adapters_are_not_candidates():
    # A model that already has adapter layers (e.g. after apply_plan): their base Linears are
    # frozen by design, so scoring or planning them is refused or skipped.
    model = tiny_mlp()
    model[0] = pk.nn.SVDNodeLinear.from_linear(model[0], 2)
    model[3] = LoRALinear.from_linear(model[3], 2)
    batches = make_batches(2)
    scores = sensitivity(model, batches, ce_loss, exclude=[], progress=False)
    assert sorted(scores) == ["5"]
    with pytest.raises(ValueError, match=r"'3.base', the frozen base of the adapter layer '3'"):
        sensitivity(model, batches, ce_loss, targets=["3.base"], progress=False)
    with pytest.raises(ValueError, match=r"'0.base', the frozen base of the adapter layer '0'"):
        apply_plan(model, spt_plan({"0.base": torch.rand(7, 5)}, 3, r=1))


@pytest.mark.parametrize("structured", ["lora", "adapter"])
def test_end_to_end_spt_finetuning(structured):
    torch.manual_seed(0)
    student = MLP()
    # The target task: the same network with its hidden layers moved (a low-rank change of
    # blocks.1 and a few large entries of blocks.0), so tuning those layers can learn it.
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.blocks[1].weight += 0.8 * torch.randn(48, 2) @ torch.randn(2, 48) / 48 ** 0.5
        teacher.blocks[0].weight.view(-1)[torch.randperm(48 * 16)[:20]] += 1.5
    x_all = torch.randn(512, 16)
    y_all = teacher(x_all).detach()
    batches = [(x_all[i:i + 64], y_all[i:i + 64]) for i in range(0, 512, 64)]

    def mse(model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    scores = sensitivity(student, batches[:4], mse, progress=False)
    assert list(scores) == ["blocks.0", "blocks.1"]
    # 400 holds one structured block of blocks.1 (4 (48 + 48) = 384) and a few sparse entries of
    # blocks.0, whose structured block (4 (16 + 48) = 256) does not fit beside it.
    plan = spt_plan(scores, 400, r=4, structured=structured)
    assert [e.kind for e in plan.entries] == ["sparse", structured]
    assert 384 < plan.total <= 400
    apply_plan(student, plan)
    assert trainable_count(student) == plan.total

    opt = torch.optim.Adam(trainable(student), lr=1e-2)
    with torch.no_grad():
        initial = nn.functional.mse_loss(student(x_all), y_all).item()
    fit(opt, lambda step: mse(student, batches[step % len(batches)]), range(60))
    with torch.no_grad():
        final = nn.functional.mse_loss(student(x_all), y_all).item()
    assert initial > 1e-3
    assert final < 0.7 * initial, (initial, final, str(plan))


def test_public_surface():
    assert pk.select.SPTPlan is SPTPlan
    assert "select" in pk.__all__
    for name in ["sensitivity", "spt_plan", "apply_plan", "SPTPlan"]:
        assert name in pk.select.__all__
