"""SVD-node selection with an ℓ2,g-regularised Gaussian graphical model (Zheng & Cao,
arXiv:2412.08592; the algorithm as the authors' public code runs it).

Four steps:

1. :class:`NodeScorer` records, after each backward of a warm-up phase, one AdaLoRA-style score
   per SVD node (every rank-1 component of every :class:`~peft_kernels.nn.SVDNodeLinear`, and
   every trainable bias): a sample row ``[nodes]`` per step.
2. :func:`ggm_statistics` turns the samples into the covariance S and column mean μ of their
   row-normalised logarithms.
3. :func:`ggm_bcd` maximises ``log det Ω − tr(SΩ) − λ‖Ω − Δ‖_F² − τ Σ_{j∉I} ‖Δ_{I,j}‖₂^g`` by
   block coordinate descent (I: the important nodes, top by μ); :func:`ggm_allocate` runs 2 and
   3 and keeps I plus the nodes j ∉ I with the largest ``‖Ω_{I,j}‖₂`` up to the budget.
4. :func:`apply_allocation` freezes every other node (``SVDNodeLinear.freeze_nodes``).

:func:`ggm_finetune_plan` chains them over a few warm-up batches.
"""
from __future__ import annotations

import inspect
import math
import numbers
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from peft_kernels.nn.svd_node import SVDNodeLinear

__all__ = ["NodeScorer", "GGMAllocation", "GGMSolution", "ggm_statistics", "ggm_bcd",
           "ggm_allocate", "generalized_soft_threshold", "gst_threshold", "apply_allocation",
           "ggm_finetune_plan"]

NodeTable = Sequence[tuple[str, int]]


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------

def _int_arg(value: Any, name: str, where: str, low: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}") from None
    if value < low:
        raise ValueError(f"{where}: {name} must be >= {low}, got {value}")
    return value


def _real_arg(value: Any, name: str, where: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        kind = "> 0" if positive else ">= 0"
        raise ValueError(f"{where}: {name} must be a finite number {kind}, got {value}")
    return value


def _check_g(g: Any, where: str) -> float:
    if isinstance(g, bool) or not isinstance(g, numbers.Real):
        raise TypeError(f"{where}: g must be a real number, got {type(g).__name__}")
    g = float(g)
    if not 0 < g <= 1:
        raise ValueError(f"{where}: g must lie in (0, 1], got {g}")
    return g


# ----------------------------------------------------------------------------------------------
# 1. node scores
# ----------------------------------------------------------------------------------------------

class NodeScorer:
    """AdaLoRA-style sensitivity of every SVD node, one sample row per :meth:`step`.

    Call :meth:`step` once per warm-up step, after ``loss.backward()`` and before the gradients
    are cleared (an explicit call rather than a hook: gradient accumulation and optimizer
    stepping stay the caller's choice). Per entry θ of A, B and each trainable bias:
    ``I = |θ ⊙ ∇θ|``, ``Ī ← β₁ Ī + (1 − β₁) I``, ``Ū ← β₂ Ū + (1 − β₂) |I − Ī|`` (Ī already
    updated, as in AdaLoRA), and a node's score is the mean of ``Ī · Ū`` over its entries:
    column j of A with row j of B for component j, the bias vector for the bias node.

    ``node_table[k] = (module name, node index)`` names column k of :meth:`samples`; node
    indices follow :attr:`SVDNodeLinear.num_nodes` (components 0..rank−1, then the bias).
    Parameters without a gradient (a layer the loss did not reach) count as ``I = 0``.
    The model's node structure must not change while scoring (no ``freeze_nodes`` in between).
    """

    def __init__(self, model: nn.Module, *, beta1: float = 0.85, beta2: float = 0.85):
        if not isinstance(model, nn.Module):
            raise TypeError(f"NodeScorer: model must be an nn.Module, got {type(model).__name__}")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
                raise ValueError(f"NodeScorer: {name} must be a number in [0, 1), got {beta!r}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self._layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SVDNodeLinear)]
        if not self._layers:
            raise ValueError("NodeScorer: model has no SVDNodeLinear module")
        for name, m in self._layers:
            if m.merged:
                raise ValueError(f"NodeScorer: SVDNodeLinear {name!r} is merged; unmerge() it first")
        # What the table promises per layer; step() checks it still holds.
        self._shapes = [(m.A, m.B, m.train_bias) for _, m in self._layers]
        self.node_table: tuple[tuple[str, int], ...] = tuple(
            (name, k) for name, m in self._layers for k in range(m.num_nodes))
        self._ema: list[Optional[list[tuple[Tensor, Tensor]]]] = [None] * len(self._layers)
        self._rows: list[Tensor] = []

    @property
    def num_nodes(self) -> int:
        return len(self.node_table)

    @property
    def steps(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def step(self) -> None:
        """Fold the current gradients into the moving averages and record one sample row."""
        # Check everything before touching the averages, so a bad call leaves them as they were.
        any_grad = False
        for (name, m), (A, B, train_bias) in zip(self._layers, self._shapes):
            if m.A is not A or m.B is not B or m.train_bias != train_bias or m.merged:
                raise RuntimeError(f"NodeScorer.step: the nodes of {name!r} changed since the scorer "
                                   "was created (freeze_nodes, merge or a reload); start a new scorer")
            any_grad |= A.grad is not None or B.grad is not None or (
                train_bias and m.base.bias.grad is not None)
        if not any_grad:
            raise RuntimeError("NodeScorer.step: no SVD node has a gradient; call step() after "
                               "loss.backward() and before the gradients are cleared")
        # Every layer's A, B (and bias) in one list, so the moving averages are a handful of
        # multi-tensor (foreach) kernels per step whatever the number of layers.
        params, grads, avgs, uncs = [], [], [], []
        for li, ((name, m), (A, B, train_bias)) in enumerate(zip(self._layers, self._shapes)):
            layer_params = [A, B] + ([m.base.bias] if train_bias else [])
            if self._ema[li] is None:
                # Averages in float32 or wider: half-precision EMAs of tiny products underflow.
                self._ema[li] = [tuple(torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                                       for _ in range(2)) for p in layer_params]
            for p, (avg, unc) in zip(layer_params, self._ema[li]):
                params.append(p.detach().to(avg.dtype))
                grads.append(torch.zeros_like(avg) if p.grad is None else p.grad.to(avg.dtype))
                avgs.append(avg)
                uncs.append(unc)
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(avgs, ipt, 1.0 - self.beta1)
        torch._foreach_sub_(ipt, avgs)
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(uncs, ipt, 1.0 - self.beta2)
        products = iter(torch._foreach_mul(avgs, uncs))
        parts = []
        for A, B, train_bias in self._shapes:
            # Component j owns column j of A ([out, r]) and row j of B ([r, in]).
            out_f, in_f = A.shape[0], B.shape[1]
            parts.append((next(products).sum(0) + next(products).sum(1)) / (out_f + in_f))
            if train_bias:
                parts.append(next(products).mean().reshape(1))
        device = parts[0].device
        self._rows.append(torch.cat([p.to(device=device, dtype=torch.float64) for p in parts]))

    def samples(self) -> Tensor:
        """The recorded rows as a float64 tensor ``[steps, nodes]``."""
        if not self._rows:
            raise RuntimeError("NodeScorer.samples: no step recorded yet")
        return torch.stack(self._rows)


# ----------------------------------------------------------------------------------------------
# 2. statistics of the samples
# ----------------------------------------------------------------------------------------------

def _check_samples(samples: Any, where: str) -> Tensor:
    if not isinstance(samples, Tensor):
        raise TypeError(f"{where}: samples must be a tensor [steps, nodes], got {type(samples).__name__}")
    if not samples.is_floating_point():
        raise TypeError(f"{where}: samples must be floating point, got {samples.dtype}")
    if samples.dim() != 2 or samples.numel() == 0:
        raise ValueError(f"{where}: samples must be a non-empty [steps, nodes] matrix, got shape "
                         f"{tuple(samples.shape)}")
    if samples.shape[0] < 2:
        raise ValueError(f"{where}: samples needs at least 2 rows (steps) for a covariance, got "
                         f"{samples.shape[0]}")
    if torch.isnan(samples).any():
        raise ValueError(f"{where}: samples contains NaN")
    if (samples < 0).any():
        raise ValueError(f"{where}: samples must be >= 0 (node scores are products of magnitudes)")
    return samples.detach().to(torch.float64)


def ggm_statistics(samples: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, μ)`` of the node scores as the authors preprocess them: ``log``, clamp to ±200
    (zero scores become −200), each row scaled to unit ℓ2 norm, then the sample covariance S
    (``[nodes, nodes]``, divisor steps − 1) and the column mean μ (``[nodes]``), float64."""
    x = _check_samples(samples, "ggm_statistics").log().clamp(-200.0, 200.0)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-300)
    mu = x.mean(0)
    centred = x - mu
    S = centred.mT @ centred / (x.shape[0] - 1)
    return S, mu


# ----------------------------------------------------------------------------------------------
# 3. block coordinate descent
# ----------------------------------------------------------------------------------------------

def gst_threshold(lam: float, tau: float, g: float) -> tuple[float, float]:
    """``(t, r_t)`` of :func:`generalized_soft_threshold`: norms ``a ≤ t`` go to 0, and at
    ``a = t`` the nonzero minimiser is ``r_t``.

    With ``c = τ / (2λ)`` the problem is ``min_r ½ (r − a)² + c r^g``, whose threshold is
    ``r_t + c g r_t^(g−1)`` with ``r_t = (2c(1 − g))^(1/(2−g))`` (generalised soft
    thresholding, Zuo et al., ICCV 2013); for g = 1 it is plain soft thresholding, t = c.
    """
    c = tau / (2.0 * lam)
    if g == 1.0:
        return c, 0.0
    r_t = (2.0 * c * (1.0 - g)) ** (1.0 / (2.0 - g))
    return r_t + c * g * r_t ** (g - 1.0), r_t


def generalized_soft_threshold(norms: Tensor, lam: float, tau: float, g: float) -> Tensor:
    """``argmin_{r ≥ 0} λ (r − a)² + τ r^g`` for each ``a`` in ``norms`` (``a ≥ 0``), g ∈ (0, 1].

    This is the Δ-step's scalar problem: ``min_d λ‖d − ω‖² + τ‖d‖^g`` has ``d = r ω / ‖ω‖`` with
    ``a = ‖ω‖``. Above the closed-form threshold (:func:`gst_threshold`) the minimiser is the
    root of ``φ(r) = r − a + c g r^(g−1)`` (``c = τ/(2λ)``) in ``[r_t, a]``; φ is convex and
    increasing there, so Newton's method started at ``a`` decreases monotonically onto it.
    At ``a = t`` exactly (two minimisers) the result is 0.
    """
    lam = _real_arg(lam, "lam", "generalized_soft_threshold")
    tau = _real_arg(tau, "tau", "generalized_soft_threshold", positive=False)
    g = _check_g(g, "generalized_soft_threshold")
    if not isinstance(norms, Tensor):
        raise TypeError(f"generalized_soft_threshold: norms must be a tensor, got {type(norms).__name__}")
    a = norms.to(torch.float64)
    if not bool((a >= 0).all()):
        raise ValueError("generalized_soft_threshold: norms must be >= 0 (and not NaN)")
    if tau == 0.0:
        return a.clone()
    t, r_t = gst_threshold(lam, tau, g)
    c = tau / (2.0 * lam)
    keep = a > t
    if g == 1.0:
        return torch.where(keep, a - c, torch.zeros_like(a))
    # Entries that go to zero get a stand-in norm above t, so every lane has a root to converge on.
    target = torch.where(keep, a, torch.full_like(a, 2.0 * t + 1.0))
    r = target.clone()
    for _ in range(50):
        step = (r - target + c * g * r.pow(g - 1.0)) / (1.0 - c * g * (1.0 - g) * r.pow(g - 2.0))
        r = torch.maximum(r - step, torch.full_like(r, r_t))
        if not bool((step.abs() > 1e-15 * r).any()):
            break
    return torch.where(keep, torch.minimum(r, a), torch.zeros_like(a))


@dataclass(frozen=True, eq=False)
class GGMSolution:
    """The result of :func:`ggm_bcd`: the final Ω and Δ, the objective after each outer
    iteration, how many ran, and whether the objective settled before the iteration bound."""

    omega: Tensor
    delta: Tensor
    objective: Tensor
    iterations: int
    converged: bool


def _shrink_columns(block: Tensor, lam: float, tau: float, g: float) -> Tensor:
    """The Δ-step on the block rows I × columns ∉ I: each column shrunk by generalised soft
    thresholding of its norm (elsewhere Δ = Ω, as in the authors' code)."""
    if block.numel() == 0:
        return block.clone()
    norms = torch.linalg.vector_norm(block, dim=0)
    shrunk = generalized_soft_threshold(norms, lam, tau, g)
    scale = torch.where(norms > 0, shrunk / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return block * scale


def _delta_step(omega: Tensor, rows: Tensor, cols: Tensor, lam: float, tau: float, g: float) -> Tensor:
    """Exact minimiser over Δ: Δ = Ω except on rows I × columns ∉ I (:func:`_shrink_columns`)."""
    delta = omega.clone()
    index = (rows[:, None], cols[None, :])
    delta[index] = _shrink_columns(omega[index], lam, tau, g)
    return delta


def _symmetric_row_major(a: Tensor) -> Tensor:
    """``a`` (exactly symmetric, as ``cholesky_inverse`` mirrors one triangle) as a row-major
    view: LAPACK results come column-major, and mixing layouts in elementwise ops costs a
    transposed read (~15× slower than a contiguous one at n = 4096)."""
    return a if a.is_contiguous() or not a.mT.is_contiguous() else a.mT


def ggm_bcd(S: Tensor, important: Union[Sequence[int], Tensor], *, lam: float = 1000.0,
            tau: float = 20.0, g: float = 0.9, iters: int = 50, tol: float = 1e-6,
            eps: float = 1e-3, ascent_steps: int = 3) -> GGMSolution:
    """Block coordinate ascent on
    ``F(Ω, Δ) = log det Ω − tr(SΩ) − λ‖Ω − Δ‖_F² − τ Σ_{j∉I} ‖Δ_{I,j}‖₂^g``.

    Start ``Ω₀ = (S + εI)⁻¹`` (S + εI is positive definite, so this is its pseudo-inverse). Each
    outer iteration:

    * Δ-step (exact): :func:`generalized_soft_threshold` of each column ``Ω_{I,j}``, j ∉ I;
      everywhere else Δ = Ω, as in the authors' code.
    * Ω-step: ``ascent_steps`` gradient steps on the smooth part with Δ fixed, along the
      symmetric gradient ``Ω⁻¹ − S − 2λ sym(Ω − Δ)`` (Ω stays symmetric). The first trial step is
      ``1/(2λ)``; it is halved until Ω stays positive definite (its Cholesky factorisation
      succeeds) and the smooth part rises by an Armijo margin, and a step that finds neither in
      40 halvings is skipped. Ω⁻¹ (``cholesky_inverse``: a third of the flops of a general
      inverse) and log det Ω come from the accepted factor; Ω⁻¹ is kept until Ω moves (the
      next outer iteration starts from it). The smooth part along ``Ω + tD`` is log det plus
      a quadratic in t whose coefficients are carried across steps, so a trial step costs one
      Cholesky factorisation. When the first trial's first-order rise ``t·‖D‖²`` is below
      1e-12 of the objective's terms (rounding, where an Armijo test only flips coins), the
      Ω-step ends: Ω is stationary for this Δ.

    Both steps never lower F, so the objective trace is non-decreasing. The loop stops after
    ``iters`` outer iterations or once ``|F_k − F_{k−1}| ≤ tol · max(1, |F_{k−1}|)``.

    Args:
        S: symmetric ``[n, n]`` covariance (computed in float64).
        important: indices of the important set I.
        lam, tau, g: λ > 0, τ ≥ 0 and the exponent g ∈ (0, 1].
        iters: the outer iteration bound; tol: the relative objective change that ends it early.
        eps: ε of ``Ω₀``; ascent_steps: gradient steps per Ω-step.
    """
    where = "ggm_bcd"
    if not isinstance(S, Tensor) or not S.is_floating_point():
        raise TypeError(f"{where}: S must be a floating-point tensor")
    if S.dim() != 2 or S.shape[0] != S.shape[1] or S.shape[0] == 0:
        raise ValueError(f"{where}: S must be a non-empty square matrix, got shape {tuple(S.shape)}")
    if not torch.isfinite(S).all():
        raise ValueError(f"{where}: S contains NaN or Inf")
    lam = _real_arg(lam, "lam", where)
    tau = _real_arg(tau, "tau", where, positive=False)
    g = _check_g(g, where)
    iters = _int_arg(iters, "iters", where, 1)
    tol = _real_arg(tol, "tol", where, positive=False)
    eps = _real_arg(eps, "eps", where)
    ascent_steps = _int_arg(ascent_steps, "ascent_steps", where, 1)
    n = S.shape[0]
    S = S.detach().to(torch.float64)
    S = torch.add(S, S.mT).mul_(0.5)
    rows = torch.as_tensor(important, dtype=torch.long).reshape(-1).to(S.device)
    if rows.numel() and (rows.min() < 0 or rows.max() >= n or torch.unique(rows).numel() != rows.numel()):
        raise ValueError(f"{where}: important must be unique indices in [0, {n}), got {rows.tolist()}")
    outside = torch.ones(n, dtype=torch.bool, device=S.device)
    outside[rows] = False
    cols = outside.nonzero().squeeze(1)

    regularised = S.clone()
    regularised.diagonal().add_(eps)
    L, info = torch.linalg.cholesky_ex(regularised)
    if int(info) != 0:
        raise ValueError(f"{where}: S + eps·I is not positive definite (S is not a covariance?)")
    omega = _symmetric_row_major(torch.cholesky_inverse(L))
    L, info = torch.linalg.cholesky_ex(omega)
    if int(info) != 0:
        raise ValueError(f"{where}: (S + eps·I)⁻¹ is numerically indefinite; increase eps")

    def logdet(chol: Tensor) -> Tensor:
        return 2.0 * chol.diagonal().log().sum()

    def inner(a: Tensor, b: Tensor) -> Tensor:
        return torch.dot(a.reshape(-1), b.reshape(-1))

    # n×n work matrices allocated once: at n in the thousands a fresh result costs ~8× the
    # arithmetic (page faults), and the loop writes only these besides the LAPACK results.
    M, direction, trial, omega_at_delta = (torch.empty_like(S) for _ in range(4))

    block_index = (rows[:, None], cols[None, :])
    mirror_index = (cols[:, None], rows[None, :])
    inverse = regularised  # Ω⁻¹ of the current Ω (here exactly S + εI), kept until Ω moves
    trace: list[float] = []
    converged = False
    previous = None
    for _ in range(iters):
        # Δ equals Ω outside rows I × columns ∉ I, so only that block of Ω − Δ is stored.
        omega_at_delta.copy_(omega)
        block = omega[block_index]
        delta_block = _shrink_columns(block, lam, tau, g)
        gap_block = block - delta_block
        # The smooth part along the ray Ω + t·D is logdet(Ω + tD) − base − t⟨M, D⟩ − λt²‖D‖²
        # with M = S + λ(G + Gᵀ) (G = Ω − Δ; the symmetric gradient is Ω⁻¹ − M) and
        # base = ⟨S, Ω⟩ + λ‖G‖². Both are carried across accepted steps (G moves by tD), so a
        # trial costs one Cholesky factorisation and no n×n arithmetic besides forming Ω + tD.
        M.copy_(S)
        M.index_put_(block_index, lam * gap_block, accumulate=True)
        M.index_put_(mirror_index, lam * gap_block.mT, accumulate=True)
        base = inner(S, omega) + lam * gap_block.square().sum()
        value = logdet(L) - base
        for _ in range(ascent_steps):
            if inverse is None:
                inverse = _symmetric_row_major(torch.cholesky_inverse(L))
            torch.sub(inverse, M, out=direction)
            slope = inner(direction, direction)
            along = inner(M, direction)
            step = 1.0 / (2.0 * lam)
            # A first-order rise below ~1e4 ulps of the objective's terms cannot be told from
            # rounding, so the Armijo test would only flip coins (and halve 40 times); such a
            # step would move Ω by ‖tD‖ ≤ 1e-6·sqrt(|F|/λ) at most, so Ω is stationary here.
            if float(step * slope) <= 1e-12 * max(1.0, abs(float(value)) + 2.0 * abs(float(base))):
                break
            for _ in range(40):
                torch.add(omega, direction, alpha=step, out=trial)
                L_trial, info = torch.linalg.cholesky_ex(trial)
                if int(info) == 0:
                    rise = -step * along - lam * step * step * slope
                    trial_value = logdet(L_trial) - base + rise
                    if bool(trial_value >= value + 1e-4 * step * slope):
                        omega, trial = trial, omega
                        L, value, inverse = L_trial, trial_value, None
                        base = base - rise
                        M.add_(direction, alpha=2.0 * lam * step)
                        break
                step /= 2.0
            else:
                break  # no acceptable step: Ω is (numerically) optimal for this Δ
        penalty = tau * torch.linalg.vector_norm(delta_block, dim=0).pow(g).sum() if cols.numel() else 0.0
        current = float(value - penalty)
        trace.append(current)
        if not math.isfinite(current):
            break  # report, never loop on a broken objective
        if previous is not None and abs(current - previous) <= tol * max(1.0, abs(previous)):
            converged = True
            break
        previous = current
    delta = _delta_step(omega_at_delta, rows, cols, lam, tau, g)
    objective = torch.tensor(trace, dtype=torch.float64)
    return GGMSolution(omega, delta, objective, len(trace), converged)


@dataclass(frozen=True, eq=False)
class GGMAllocation:
    """The result of :func:`ggm_allocate`.

    ``selected``: sorted node indices to keep training (I plus the best-scored others), exactly
    ``budget`` of them. ``important``: I, sorted. ``scores``: ``‖Ω_{I,j}‖₂`` per node, +inf for
    the nodes of I (kept regardless). ``mu``: the column means that chose I. ``objective``: the
    BCD objective after each outer iteration. ``node_table``: ``(module name, node index)`` per
    column when known (:func:`ggm_finetune_plan` fills it in).
    """

    selected: Tensor
    important: Tensor
    scores: Tensor
    mu: Tensor
    objective: Tensor
    iterations: int
    converged: bool
    budget: int
    node_table: Optional[tuple[tuple[str, int], ...]] = None

    def selected_nodes(self, node_table: Optional[NodeTable] = None) -> dict[str, list[int]]:
        """``{module name: [node indices to keep]}`` over the node table (every module listed)."""
        table = _check_table(node_table if node_table is not None else self.node_table,
                             "GGMAllocation.selected_nodes")
        kept: dict[str, list[int]] = {name: [] for name, _ in table}
        for k in self.selected.tolist():
            name, node = table[k]
            kept[name].append(node)
        return kept


def _check_budget(n_important: Any, budget: Any, n: int, where: str) -> tuple[int, int]:
    """``1 <= n_important <= budget <= n`` (n nodes), as ints."""
    n_important = _int_arg(n_important, "n_important", where, 1)
    budget = _int_arg(budget, "budget", where, 1)
    if n_important > n:
        raise ValueError(f"{where}: n_important must be <= the node count {n}, got {n_important}")
    if not n_important <= budget <= n:
        raise ValueError(f"{where}: budget must lie in [n_important, nodes] = [{n_important}, {n}], "
                         f"got {budget}")
    return n_important, budget


def ggm_allocate(samples: Tensor, budget: int, *, n_important: int = 30, lam: float = 1000.0,
                 tau: float = 20.0, g: float = 0.9, iters: int = 50, tol: float = 1e-6,
                 eps: float = 1e-3, ascent_steps: int = 3) -> GGMAllocation:
    """Choose ``budget`` nodes from warm-up scores (``samples``: ``[steps, nodes]``, ≥ 0).

    :func:`ggm_statistics` gives S and μ; I is the ``n_important`` nodes of largest μ (ties:
    lower index first); :func:`ggm_bcd` runs on S with I (its keyword arguments pass through);
    the ``budget − n_important`` nodes j ∉ I with the largest ``‖Ω_{I,j}‖₂`` join I. All in
    float64. Requires ``1 ≤ n_important ≤ budget ≤ nodes``.
    """
    where = "ggm_allocate"
    x = _check_samples(samples, where)
    n = x.shape[1]
    n_important, budget = _check_budget(n_important, budget, n, where)
    S, mu = ggm_statistics(x)
    order = torch.sort(mu, descending=True, stable=True).indices
    important = order[:n_important]
    solution = ggm_bcd(S, important, lam=lam, tau=tau, g=g, iters=iters, tol=tol, eps=eps,
                       ascent_steps=ascent_steps)
    scores = torch.linalg.vector_norm(solution.omega[important], dim=0)
    scores[important] = math.inf
    ranked = torch.sort(scores, descending=True, stable=True).indices
    selected = torch.sort(ranked[:budget]).values
    return GGMAllocation(selected=selected.cpu(), important=torch.sort(important).values.cpu(),
                         scores=scores.cpu(), mu=mu.cpu(), objective=solution.objective,
                         iterations=solution.iterations, converged=solution.converged,
                         budget=budget)


# ----------------------------------------------------------------------------------------------
# 4. application
# ----------------------------------------------------------------------------------------------

def _check_table(node_table: Any, where: str) -> tuple[tuple[str, int], ...]:
    if node_table is None:
        raise ValueError(f"{where}: node_table is required (e.g. NodeScorer.node_table)")
    try:
        table = tuple((name, node) for name, node in node_table)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: node_table must be a sequence of (module name, node index) pairs") from None
    for name, node in table:
        if not isinstance(name, str) or isinstance(node, bool) or not isinstance(node, int):
            raise TypeError(f"{where}: node_table entries must be (str, int), got ({name!r}, {node!r})")
    if not table:
        raise ValueError(f"{where}: node_table is empty")
    return table


def apply_allocation(model: nn.Module, selection: Union[GGMAllocation, Sequence[int], Tensor],
                     node_table: Optional[NodeTable] = None) -> nn.Module:
    """Freeze every node not in ``selection`` (``SVDNodeLinear.freeze_nodes``); returns ``model``.

    ``selection``: a :class:`GGMAllocation` (its ``node_table`` is used when ``node_table`` is
    None) or column indices into ``node_table``. The table must list every node of every
    SVDNodeLinear of the model, numbered as they are now, so afterwards the model's trainable
    node count equals the selection size. Parameters outside the SVD nodes are left alone. A and
    B become new Parameters: build the optimizer after this call. The model is checked fully
    before anything changes.
    """
    where = "apply_allocation"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(selection, GGMAllocation):
        if node_table is None:
            node_table = selection.node_table
        selection = selection.selected
    table = _check_table(node_table, where)
    if isinstance(selection, bool) or not isinstance(selection, (Tensor, Sequence)):
        raise TypeError(f"{where}: selection must be a GGMAllocation or a sequence of node indices, "
                        f"got {type(selection).__name__}")
    idx = torch.as_tensor(selection)
    if idx.dim() != 1 or (idx.numel() and (idx.is_floating_point() or idx.dtype == torch.bool)):
        raise TypeError(f"{where}: selection must be 1-D integer node indices")
    idx = idx.long().cpu()
    if idx.numel() and (idx.min() < 0 or idx.max() >= len(table)):
        raise ValueError(f"{where}: selection indices must lie in [0, {len(table)}), got "
                         f"{idx.tolist()}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{where}: selection indices must be unique")

    layers = {name: m for name, m in model.named_modules() if isinstance(m, SVDNodeLinear)}
    listed: dict[str, set[int]] = {}
    for name, node in table:
        listed.setdefault(name, set()).add(node)
    for name, nodes in listed.items():
        if name not in layers:
            raise ValueError(f"{where}: node_table names {name!r}, which is not an SVDNodeLinear of the model")
        if nodes != set(range(layers[name].num_nodes)):
            raise ValueError(f"{where}: node_table lists nodes {sorted(nodes)} of {name!r}, but it has "
                             f"{layers[name].num_nodes} trainable nodes now (a stale table?)")
        if layers[name].merged:
            raise ValueError(f"{where}: SVDNodeLinear {name!r} is merged; unmerge() it first")
    missing = sorted(set(layers) - set(listed))
    if missing:
        raise ValueError(f"{where}: node_table does not cover the SVDNodeLinear modules {missing}")

    keep = {name: torch.zeros(m.num_nodes, dtype=torch.bool) for name, m in layers.items()}
    for k in idx.tolist():
        name, node = table[k]
        keep[name][node] = True
    for name, m in layers.items():
        m.freeze_nodes(~keep[name])
    return model


def ggm_finetune_plan(model: nn.Module, batches: Iterable[Any],
                      loss_fn: Callable[[nn.Module, Any], Tensor], budget: int, *,
                      optimizer: Optional[torch.optim.Optimizer] = None,
                      **ggm_kwargs: Any) -> GGMAllocation:
    """Warm up, allocate, freeze: the whole selection in one call; returns the allocation
    (with ``node_table`` filled in).

    For each batch: clear the gradients, ``loss_fn(model, batch)`` (a scalar loss, as in
    :func:`~peft_kernels.select.sensitivity`), backward, :meth:`NodeScorer.step`, and
    ``optimizer.step()`` when an optimizer is given (the paper scores during the first epoch of
    training; without one, every sample is taken at the initial weights). Gradients are cleared
    at the end. Then :func:`ggm_allocate` (``ggm_kwargs`` pass through) and
    :func:`apply_allocation`. Rebuild any optimizer afterwards: A and B are new Parameters.
    """
    where = "ggm_finetune_plan"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable as loss_fn(model, batch)")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer or None")
    scorer = NodeScorer(model)
    # Every argument of the allocation is checked before the warm-up trains the model.
    allocate_args = inspect.signature(ggm_allocate).parameters
    unknown = sorted((set(ggm_kwargs) - set(allocate_args)) | (set(ggm_kwargs) & {"samples", "budget"}))
    if unknown:
        raise TypeError(f"{where}: unexpected keyword arguments {unknown} (ggm_kwargs pass to "
                        "ggm_allocate)")
    n_important = ggm_kwargs.get("n_important", allocate_args["n_important"].default)
    _check_budget(n_important, budget, scorer.num_nodes, where)
    try:
        with torch.enable_grad():
            for batch in batches:
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError(f"{where}: loss_fn must return a scalar loss tensor")
                if not loss.requires_grad:
                    raise ValueError(f"{where}: the loss does not depend on any trainable parameter")
                loss.reshape(()).backward()
                scorer.step()
                if optimizer is not None:
                    optimizer.step()
    finally:
        model.zero_grad(set_to_none=True)
    if scorer.steps < 2:
        raise ValueError(f"{where}: batches must hold at least 2 batches (one sample row each), "
                         f"got {scorer.steps}")
    result = ggm_allocate(scorer.samples(), budget, **ggm_kwargs)
    result = replace(result, node_table=scorer.node_table)
    apply_allocation(model, result)
    return result
