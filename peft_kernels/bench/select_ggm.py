"""GGM node selection cases: pk.select.ggm_allocate vs a plain float64 transcription of the
published loop (:func:`published_ggm_loop`: explicit ``torch.linalg.inv`` in every ascent step,
``eigvalsh`` for the positive-definiteness test and log det, ``pinv`` for Ω₀), same samples,
same hyperparameters. The error is the fraction of the budget on which the two selections
differ; the gate is 0 (identical sets).

Samples imitate warm-up scores: log-normal with a few shared factors (layers that learn
together) plus per-step noise, magnitudes ~1e-8 as |θ ⊙ ∇θ| products are."""
from __future__ import annotations

import math

import torch

from peft_kernels.bench.registry import Case, Measured, register
from peft_kernels.select.ggm import ggm_allocate


def published_ggm_loop(samples, budget, *, n_important=30, lam=1000.0, tau=20.0, g=0.9,
                       iters=50, tol=1e-6, eps=1e-3, ascent_steps=3, return_scores=False):
    """The published allocation written out plainly in float64 (the benchmark's baseline and an
    independent check of pk.select.ggm_allocate): returns the sorted selected node indices (and
    the per-node scores ``‖Ω_{I,j}‖₂``, +inf on I, with ``return_scores=True``).

    Preprocess (log, clamp ±200, unit rows, covariance and mean), I = top n_important by mean,
    Ω = pinv(S + εI); then per outer iteration the column-wise generalised soft thresholding of
    Ω on rows I (the scalar shrinkage by its fixed-point iteration) and ``ascent_steps`` gradient
    steps on the smooth part, each inverting Ω explicitly, with the same step rule as the
    package (first step 1/(2λ), halved until Ω is positive definite and an Armijo rise holds).
    """
    x = torch.clamp(torch.log(samples.double()), -200, 200)
    x = x / torch.norm(x, dim=1, keepdim=True)
    S = torch.cov(x.T)
    mean = x.mean(dim=0)
    n = S.shape[0]
    important = torch.argsort(mean, descending=True, stable=True)[:n_important]
    mask = torch.ones(n, dtype=torch.bool, device=S.device)
    mask[important] = False
    others = torch.nonzero(mask).flatten()
    eye = torch.eye(n, dtype=torch.float64, device=S.device)
    omega = torch.linalg.pinv(S + eps * eye)

    c = tau / (2 * lam)
    if g < 1:
        r_t = (2 * c * (1 - g)) ** (1 / (2 - g))
        threshold = r_t + c * g * r_t ** (g - 1)
    else:
        threshold = c

    def shrink(a):
        r = a.clone()
        for _ in range(100):  # r = a − c g r^(g−1) contracts onto the nonzero minimiser
            r = a - c * g * r.clamp_min(1e-300) ** (g - 1)
        return torch.where(a > threshold, r, torch.zeros_like(a))

    def smooth(om, de):
        eig = torch.linalg.eigvalsh(om)
        if eig.min() <= 0:
            return -math.inf
        return (torch.log(eig).sum() - torch.trace(S @ om) - lam * torch.sum((om - de) ** 2)).item()

    previous = None
    for _ in range(iters):
        delta = omega.clone()
        block = omega[important][:, others]
        norms = torch.norm(block, dim=0)
        factor = torch.where(norms > 0, shrink(norms) / norms, torch.zeros_like(norms))
        delta[important.unsqueeze(1), others.unsqueeze(0)] = block * factor
        value = smooth(omega, delta)
        for _ in range(ascent_steps):
            grad = torch.linalg.inv(omega) - S - 2 * lam * (omega - delta)
            grad = (grad + grad.T) / 2
            slope = torch.sum(grad ** 2).item()
            step = 1 / (2 * lam)
            for _ in range(40):
                candidate = omega + step * grad
                candidate_value = smooth(candidate, delta)
                if candidate_value >= value + 1e-4 * step * slope:
                    omega, value = candidate, candidate_value
                    break
                step /= 2
            else:
                break
        penalty = tau * torch.sum(torch.norm(delta[important][:, others], dim=0) ** g).item()
        current = value - penalty
        if previous is not None and abs(current - previous) <= tol * max(1.0, abs(previous)):
            break
        previous = current

    scores = torch.norm(omega[important], dim=0)
    scores[important] = math.inf
    chosen = torch.argsort(scores, descending=True, stable=True)[:budget]
    selected = torch.sort(chosen).values.cpu()
    return (selected, scores.cpu()) if return_scores else selected


def warmup_like_samples(steps, nodes, *, factors=8, seed=0):
    """Positive scores ``exp(z)``: z = −18 + shared factors + noise (see the module note)."""
    gen = torch.Generator().manual_seed(seed)
    loadings = torch.randn(factors, nodes, generator=gen, dtype=torch.float64)
    level = torch.randn(nodes, generator=gen, dtype=torch.float64)
    z = (-18.0 + level + torch.randn(steps, factors, generator=gen, dtype=torch.float64) @ loadings / 3
         + 0.5 * torch.randn(steps, nodes, generator=gen, dtype=torch.float64))
    return z.exp()


def selection_mismatch(got, want, budget):
    """The fraction of the budget on which two selections differ (0.0 when identical)."""
    common = len(set(got.tolist()) & set(want.tolist()))
    return 1.0 - common / budget


def _setup(nodes, steps, budget, iters, device):
    def setup() -> Measured:
        samples = warmup_like_samples(steps, nodes).to(device)
        kwargs = dict(n_important=30, iters=iters)

        def kernel():
            return ggm_allocate(samples, budget, **kwargs).selected

        def baseline():
            return published_ggm_loop(samples, budget, **kwargs)

        return Measured(
            kernel=kernel,
            baseline=baseline,
            error=lambda: selection_mismatch(kernel(), baseline(), budget),
            tolerance=0.0,
        )

    return setup


for _device in ("cpu", "cuda"):
    register(Case(
        name="ggm_allocate 434 nodes (RoBERTa-base) 300 steps budget 60", op="select_ggm",
        device=_device, setup=_setup(434, 300, 60, 50, _device),
        baseline_name="published loop, float64 (inv + eigvalsh per ascent step)",
        warmup=0, max_reps=1, measure_memory=False,  # the baseline takes ~6 s per call
        notes="error = fraction of the selection that differs; gate 0",
    ))
    register(Case(
        name="ggm_allocate 4096 nodes 600 steps budget 400 iters=10", op="select_ggm",
        device=_device, setup=_setup(4096, 600, 400, 10, _device),
        baseline_name="published loop, float64 (inv + eigvalsh per ascent step)",
        quick=False, warmup=0, max_reps=1, measure_memory=False,
        notes="10 outer iterations and one timed call: the baseline takes ~5 min per call",
    ))
