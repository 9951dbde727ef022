"""GGM node selection: node scores, generalised soft thresholding, block coordinate descent,
agreement with the published loop, allocation and end-to-end tuning."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels.bench.select_ggm import published_ggm_loop, warmup_like_samples
from peft_kernels.nn import SVDNodeLinear
from peft_kernels.select import (GGMAllocation, NodeScorer, apply_allocation,
                                 generalized_soft_threshold, ggm_allocate, ggm_bcd,
                                 ggm_finetune_plan, ggm_statistics, gst_threshold)
from peft_kernels.select.ggm import _delta_step
from training import fit, trainable


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Every matrix here is at most 60 x 60: handing such work between threads costs more than it
    # does, and on a busy machine the spinning threads slow these tests tenfold.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------------------------
# generalised soft thresholding
# ----------------------------------------------------------------------------------------------

GST_PARAMS = [(1000.0, 20.0, 0.9), (1.0, 1.0, 0.5), (2.0, 0.3, 0.2), (5.0, 1.0, 1.0), (0.5, 3.0, 0.7)]


@pytest.mark.parametrize("lam,tau,g", GST_PARAMS)
def test_gst_matches_brute_force(lam, tau, g):
    t, _ = gst_threshold(lam, tau, g)
    # Zero outputs (0, below and just below the threshold) and nonzero ones just above it and far.
    norms = torch.tensor([0.0, 0.3 * t, 0.99 * t, 1.01 * t, 1.5 * t, 4 * t, 10 * t + 2.0],
                         dtype=torch.float64)
    got = generalized_soft_threshold(norms, lam, tau, g)
    for a, r in zip(norms.tolist(), got.tolist()):
        grid = np.linspace(0.0, max(a, 1e-12) * 1.05, 400_001)
        h = lam * (grid - a) ** 2 + tau * grid ** g
        best = grid[h.argmin()]
        spacing = grid[1]
        h_got = lam * (r - a) ** 2 + tau * r ** g
        assert h_got <= h.min() + 1e-12 * max(1.0, abs(h.min())), (a, r, best)
        assert abs(r - best) <= 2 * spacing, (a, r, best)
        assert (r == 0.0) == (a <= t)


def test_delta_step_is_columnwise_shrinkage():
    gen = torch.Generator().manual_seed(3)
    omega = torch.randn(7, 7, generator=gen, dtype=torch.float64) * 0.1
    rows, cols = torch.tensor([1, 4]), torch.tensor([0, 2, 3, 5, 6])
    lam, tau, g = 10.0, 0.5, 0.6
    delta = _delta_step(omega, rows, cols, lam, tau, g)
    t, _ = gst_threshold(lam, tau, g)
    zeros = 0
    for j in cols.tolist():
        w = omega[rows, j]
        r = generalized_soft_threshold(w.norm().reshape(1), lam, tau, g)[0]
        torch.testing.assert_close(delta[rows, j], w * r / w.norm(), rtol=1e-13, atol=1e-15)
        zeros += int(w.norm() <= t)
    assert 0 < zeros < len(cols)  # both branches are exercised
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[rows[:, None], cols[None, :]] = False
    assert torch.equal(delta[mask], omega[mask])  # Δ = Ω off the thresholded block


# ----------------------------------------------------------------------------------------------
# block coordinate descent on a known sparse precision matrix
# ----------------------------------------------------------------------------------------------

def sparse_precision_problem(seed, p=40, k=8, n=3000, density=0.35, weight=0.3):
    """Θ = I plus ±weight edges from some columns j ∉ I (I = 0..k−1) to two rows of I; S from
    n Gaussian samples with covariance Θ⁻¹. Returns S, I and which columns j ∉ I touch I."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.eye(p, dtype=torch.float64)
    touches = torch.zeros(p, dtype=torch.bool)
    for j in range(k, p):
        if torch.rand(1, generator=gen).item() < density:
            touches[j] = True
            for i in torch.randperm(k, generator=gen)[:2].tolist():
                sign = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
                theta[i, j] = theta[j, i] = sign * weight
    assert torch.linalg.eigvalsh(theta).min() > 0.05
    chol = torch.linalg.cholesky(torch.linalg.inv(theta))
    x = torch.randn(n, p, generator=gen, dtype=torch.float64) @ chol.T
    return torch.cov(x.T), torch.arange(k), touches[k:]


@pytest.mark.parametrize("params", [dict(), dict(lam=10.0, tau=1.0, g=0.5, iters=60)])
def test_bcd_objective_never_decreases(params):
    S, important, _ = sparse_precision_problem(0)
    sol = ggm_bcd(S, important, **params)
    assert sol.iterations == len(sol.objective) >= 2
    # Both block steps are exact or Armijo ascent: any decrease is rounding of log det and the
    # sums (~1e-13 relative at p = 40); 1e-10 relative leaves margin.
    steps = sol.objective.diff()
    assert (steps >= -1e-10 * sol.objective[1:].abs()).all(), steps.min()
    assert torch.isfinite(sol.objective).all()
    assert torch.linalg.cholesky_ex(sol.omega).info == 0


def test_bcd_recovers_support():
    # Support: columns j ∉ I whose Δ_{I,j} survives the thresholding, against the columns with a
    # true edge into I. Over 3 problems ~30% of columns touch I, so picking at random has
    # precision ~0.3; the defaults (λ = 1000, τ = 20, g = 0.9, 50 iterations) must reach
    # precision and recall >= 0.9 overall.
    tp = fp = fn = 0
    for seed in range(3):
        S, important, truth = sparse_precision_problem(seed)
        sol = ggm_bcd(S, important)
        kept = sol.delta[important][:, len(important):].norm(dim=0) > 0
        tp += int((kept & truth).sum())
        fp += int((kept & ~truth).sum())
        fn += int((~kept & truth).sum())
        chance = truth.float().mean().item()
        assert chance < 0.5
    precision, recall = tp / max(tp + fp, 1), tp / (tp + fn)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)


def test_bcd_iteration_bound_and_convergence_flag():
    S, important, _ = sparse_precision_problem(1, p=20, k=4)
    capped = ggm_bcd(S, important, iters=3)
    assert capped.iterations == 3 and not capped.converged
    loose = ggm_bcd(S, important, iters=50, tol=1e-2)
    assert loose.converged and loose.iterations < 50


# ----------------------------------------------------------------------------------------------
# agreement with the published loop
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodes,steps,budget,n_important,params", [
    (50, 30, 15, 5, dict()),                                   # S singular, as in practice
    (40, 120, 12, 6, dict(iters=20)),
    (60, 40, 25, 10, dict(lam=50.0, tau=2.0, g=0.7, iters=30)),
    (30, 25, 30, 8, dict()),                                   # budget = every node
])
def test_selection_matches_published_loop(nodes, steps, budget, n_important, params):
    for seed in range(2):
        samples = warmup_like_samples(steps, nodes, seed=seed)
        got = ggm_allocate(samples, budget, n_important=n_important, **params)
        want, want_scores = published_ggm_loop(samples, budget, n_important=n_important,
                                               return_scores=True, **params)
        assert torch.equal(got.selected, want), (seed, got.selected, want)
        # Same iterates in float64 up to rounding (Cholesky vs LU inverse, and rounding-level
        # ascent steps the loop takes and ggm_bcd skips): measured <= 2e-11 relative.
        finite = torch.isfinite(want_scores)
        assert torch.equal(finite, torch.isfinite(got.scores))
        torch.testing.assert_close(got.scores[finite], want_scores[finite], rtol=0,
                                   atol=1e-9 * float(want_scores[finite].abs().max()))
        assert got.selected.numel() == budget
        assert set(got.important.tolist()) <= set(got.selected.tolist())


def test_allocation_result_fields():
    samples = warmup_like_samples(40, 50)
    res = ggm_allocate(samples, 20, n_important=6, iters=10)
    S, mu = ggm_statistics(samples)
    assert S.shape == (50, 50) and torch.equal(res.mu, mu)
    assert torch.equal(res.important, torch.sort(torch.argsort(mu, descending=True)[:6]).values)
    assert torch.isinf(res.scores[res.important]).all()
    others = res.scores[torch.isfinite(res.scores)]
    kept = [j for j in res.selected.tolist() if j not in set(res.important.tolist())]
    dropped = [j for j in range(50) if j not in set(res.selected.tolist())]
    assert res.scores[kept].min() >= res.scores[dropped].max() and others.numel() == 44
    assert res.objective.dtype == torch.float64 and res.iterations == res.objective.numel() <= 10
    assert res.budget == 20 and isinstance(res.converged, bool)


def test_ggm_allocate_bad_arguments():
    samples = warmup_like_samples(10, 12)
    with pytest.raises(ValueError, match="budget"):
        ggm_allocate(samples, 3, n_important=4)
    with pytest.raises(ValueError, match="budget"):
        ggm_allocate(samples, 13, n_important=4)
    with pytest.raises(ValueError, match="n_important"):
        ggm_allocate(samples, 12, n_important=13)
    with pytest.raises(ValueError, match="samples"):
        ggm_allocate(samples[:0], 5, n_important=2)
    with pytest.raises(ValueError, match="at least 2 rows"):
        ggm_allocate(samples[:1], 5, n_important=2)
    bad = samples.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ggm_allocate(bad, 5, n_important=2)
    with pytest.raises(ValueError, match=">= 0"):
        ggm_allocate(-samples, 5, n_important=2)
    with pytest.raises(TypeError, match="samples"):
        ggm_allocate(samples.tolist(), 5, n_important=2)
    with pytest.raises(TypeError, match="samples"):
        ggm_allocate(samples.long(), 5, n_important=2)
    with pytest.raises(TypeError, match="budget"):
        ggm_allocate(samples, 5.0, n_important=2)
    with pytest.raises(TypeError, match="budget"):
        ggm_allocate(samples, True, n_important=1)
    with pytest.raises(ValueError, match="g must"):
        ggm_allocate(samples, 5, n_important=2, g=1.5)
    with pytest.raises(ValueError, match="lam"):
        ggm_allocate(samples, 5, n_important=2, lam=0.0)
    with pytest.raises(ValueError, match="iters"):
        ggm_allocate(samples, 5, n_important=2, iters=0)
    with pytest.raises(ValueError, match="important"):
        ggm_bcd(torch.eye(4, dtype=torch.float64), [0, 0])
    with pytest.raises(ValueError, match="S"):
        ggm_bcd(torch.ones(3, 4, dtype=torch.float64), [0])


# ----------------------------------------------------------------------------------------------
# node scores, allocation, end to end
# ----------------------------------------------------------------------------------------------

class SmallNet(nn.Module):
    """Three SVDNodeLinear layers (r = 4): 5 + 4 + 5 = 14 nodes (the middle bias is frozen)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = SVDNodeLinear.from_linear(nn.Linear(16, 32, dtype=torch.float64), 4)
        self.mid = SVDNodeLinear.from_linear(nn.Linear(32, 32, dtype=torch.float64), 4, train_bias=False)
        self.out = SVDNodeLinear.from_linear(nn.Linear(32, 4, dtype=torch.float64), 4)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def svd_layers(model):
    return [m for m in model.modules() if isinstance(m, SVDNodeLinear)]


def node_count(model):
    return sum(m.num_nodes for m in svd_layers(model))


def make_batches(n, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    out = []
    for _ in range(n):
        x = torch.randn(size, 16, generator=gen, dtype=torch.float64)
        out.append((x, (x @ w).argmax(1)))
    return out


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_node_scorer_matches_reference(device):
    model = SmallNet().to(device)
    scorer = NodeScorer(model)
    assert scorer.node_table[:6] == (("inp", 0), ("inp", 1), ("inp", 2), ("inp", 3), ("inp", 4),
                                     ("mid", 0))
    assert scorer.num_nodes == node_count(model) == 14
    params = {"inp": [model.inp.A, model.inp.B, model.inp.base.bias],
              "mid": [model.mid.A, model.mid.B], "out": [model.out.A, model.out.B, model.out.base.bias]}
    state = {k: [[torch.zeros_like(p), torch.zeros_like(p)] for p in ps] for k, ps in params.items()}
    expected = []
    for batch in make_batches(4):
        model.zero_grad()
        ce_loss(model, tuple(t.to(device) for t in batch)).backward()
        scorer.step()
        row = []
        for name, ps in params.items():
            prods = []
            for p, st in zip(ps, state[name]):
                ipt = (p * p.grad).abs().detach()
                st[0] = 0.85 * st[0] + 0.15 * ipt
                st[1] = 0.85 * st[1] + 0.15 * (ipt - st[0]).abs()
                prods.append(st[0] * st[1])
            A, B = prods[0], prods[1]
            for j in range(A.shape[1]):  # per node, the plain way
                row.append(torch.cat([A[:, j], B[j, :]]).mean())
            if len(prods) == 3:
                row.append(prods[2].mean())
        expected.append(torch.stack(row))
    samples = scorer.samples()
    assert samples.shape == (4, 14) and samples.dtype == torch.float64
    torch.testing.assert_close(samples.cpu(), torch.stack(expected).cpu(), rtol=1e-12, atol=0)
    assert (samples[1:] > 0).all()


def test_node_scorer_mixed_dtypes_and_unreached_layer():
    # A bfloat16 layer (averages kept in float32) and a layer the loss never reaches (I = 0).
    torch.manual_seed(5)
    half = SVDNodeLinear.from_linear(nn.Linear(8, 6, dtype=torch.bfloat16), 3)
    idle = SVDNodeLinear.from_linear(nn.Linear(8, 6, dtype=torch.float64), 2)
    model = nn.ModuleDict({"low": half, "idle": idle})
    scorer = NodeScorer(model)
    avg = [torch.zeros(p.shape) for p in (half.A, half.B, half.base.bias)]
    unc = [torch.zeros(p.shape) for p in (half.A, half.B, half.base.bias)]
    expected = []
    for step in range(3):
        model.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(step)
        for p in (half.A, half.B, half.base.bias):  # the CPU kernel takes no bfloat16 forward
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        scorer.step()
        prods = []
        for i, p in enumerate((half.A, half.B, half.base.bias)):
            ipt = (p.detach().float() * p.grad.float()).abs()
            avg[i] = 0.85 * avg[i] + 0.15 * ipt
            unc[i] = 0.85 * unc[i] + 0.15 * (ipt - avg[i]).abs()
            prods.append(avg[i] * unc[i])
        row = [torch.cat([prods[0][:, j], prods[1][j, :]]).mean() for j in range(3)]
        row.append(prods[2].mean())
        expected.append(torch.cat([torch.stack(row).double(), torch.zeros(3, dtype=torch.float64)]))
    # float32 averages of one rounding order against another: rtol of a few float32 ulps.
    torch.testing.assert_close(scorer.samples(), torch.stack(expected), rtol=1e-6, atol=0)
    assert (scorer.samples()[:, :4] > 0).all()


def test_node_scorer_errors():
    with pytest.raises(TypeError, match="model"):
        NodeScorer("not a model")
    with pytest.raises(ValueError, match="no SVDNodeLinear"):
        NodeScorer(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="beta1"):
        NodeScorer(SmallNet(), beta1=1.0)
    model = SmallNet()
    scorer = NodeScorer(model)
    with pytest.raises(RuntimeError, match="no step"):
        scorer.samples()
    with pytest.raises(RuntimeError, match="backward"):
        scorer.step()
    ce_loss(model, make_batches(1)[0]).backward()
    model.inp.freeze_nodes([0])
    with pytest.raises(RuntimeError, match="changed"):
        scorer.step()


def test_apply_allocation_freezes_exactly_the_rest():
    model = SmallNet()
    x = make_batches(1)[0][0]
    before = model(x).detach()
    table = NodeScorer(model).node_table
    keep = [0, 4, 6, 13]  # inp component 0 and bias, mid component 1, out bias
    apply_allocation(model, keep, table)
    assert node_count(model) == len(keep)
    assert (model.inp.rank, model.inp.train_bias) == (1, True)
    assert (model.mid.rank, model.out.rank, model.out.train_bias) == (1, 0, True)
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)  # folding keeps the function


def test_apply_allocation_errors():
    model = SmallNet()
    table = NodeScorer(model).node_table
    with pytest.raises(TypeError, match="model"):
        apply_allocation(None, [0], table)
    with pytest.raises(ValueError, match="node_table"):
        apply_allocation(model, [0])
    with pytest.raises(ValueError, match=r"\[0, 14\)"):
        apply_allocation(model, [14], table)
    with pytest.raises(ValueError, match="unique"):
        apply_allocation(model, [1, 1], table)
    with pytest.raises(TypeError, match="integer"):
        apply_allocation(model, torch.tensor([0.0]), table)
    with pytest.raises(ValueError, match="does not cover"):
        apply_allocation(model, [0], [e for e in table if e[0] != "out"])
    with pytest.raises(ValueError, match="not an SVDNodeLinear"):
        apply_allocation(model, [0], table + (("nope", 0),))
    assert node_count(model) == 14  # nothing changed by the failed calls
    apply_allocation(model, [0, 1], table)
    with pytest.raises(ValueError, match="stale"):
        apply_allocation(model, [0], table)


def test_end_to_end_ggm_finetuning():
    model = SmallNet()
    batches = make_batches(12)
    x = batches[0][0]
    before = model(x).detach()
    budget = 7
    res = ggm_finetune_plan(model, batches, ce_loss, budget, n_important=3, iters=20)
    assert isinstance(res, GGMAllocation) and res.selected.numel() == budget
    assert node_count(model) == budget
    kept = res.selected_nodes()
    assert sum(len(v) for v in kept.values()) == budget and set(kept) == {"inp", "mid", "out"}
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)  # warm-up took no step

    opt = torch.optim.Adam(trainable(model), lr=1e-2)
    losses = fit(opt, lambda batch: ce_loss(model, batch), batches * 3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-6:]) < sum(losses[:6])
    assert node_count(model) == budget


def test_finetune_plan_with_optimizer_and_errors():
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    res = ggm_finetune_plan(model, make_batches(6), ce_loss, 5, optimizer=opt, n_important=2, iters=5)
    assert node_count(model) == 5 == res.selected.numel()

    model = SmallNet()
    with pytest.raises(ValueError, match="budget"):
        ggm_finetune_plan(model, make_batches(4), ce_loss, 15, n_important=2)
    with pytest.raises(ValueError, match="at least 2 batches"):
        ggm_finetune_plan(model, [], ce_loss, 5, n_important=2)
    with pytest.raises(ValueError, match="scalar"):
        ggm_finetune_plan(model, make_batches(2), lambda m, b: m(b[0]), 5, n_important=2)
    with pytest.raises(ValueError, match="budget"):
        ggm_finetune_plan(model, make_batches(4), ce_loss, 1, n_important=2)
    with pytest.raises(TypeError, match="optimizer"):
        ggm_finetune_plan(model, make_batches(4), ce_loss, 5, optimizer="sgd")
    with pytest.raises(TypeError, match="loss_fn"):
        ggm_finetune_plan(model, make_batches(4), None, 5)
    assert node_count(model) == 14 and all(p.grad is None for p in model.parameters())


def test_finetune_plan_checks_its_arguments_before_the_warm_up():
    model = SmallNet()
    calls = []

    def loss(m, b):
        calls.append(1)
        return ce_loss(m, b)

    with pytest.raises(ValueError, match=r"budget must lie in \[n_important, nodes\] = \[3, 14\]"):
        ggm_finetune_plan(model, make_batches(4), loss, 2, n_important=3)
    with pytest.raises(ValueError, match="n_important must be <= the node count 14, got 30"):
        ggm_finetune_plan(model, make_batches(4), loss, 5)  # the default n_important
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['iterations'\]"):
        ggm_finetune_plan(model, make_batches(4), loss, 5, n_important=2, iterations=3)
    assert not calls


def test_public_surface():
    for name in ("NodeScorer", "ggm_allocate", "ggm_bcd", "apply_allocation", "ggm_finetune_plan",
                 "generalized_soft_threshold", "GGMAllocation"):
        assert name in pk.select.__all__ and hasattr(pk.select, name)
