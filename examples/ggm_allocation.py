"""GGM node allocation vs random and top-μ allocation at the same budget, on data the script
makes itself.

A small MLP is pre-trained on one synthetic 10-class task; its three linears become
pk.nn.SVDNodeLinear (r = 8: 8 rank-1 nodes + a bias node each, 27 nodes). Warm-up scores over a
few batches of a related task B feed three allocations of the same number of nodes:

* GGM: pk.select.ggm_allocate (important set by mean score, the rest by ‖Ω_{I,j}‖₂),
* top-μ: the nodes with the largest mean normalised log score,
* random: uniformly chosen nodes (averaged over a few draws),

and each allocation is then fine-tuned on task B for the same steps. Prints test accuracies; a
result, not a claim.

    python examples/ggm_allocation.py [--steps 200] [--budget 9]
"""
import argparse
import copy

import torch
from torch import nn

import peft_kernels as pk
from peft_kernels import demo
from peft_kernels.demo import accuracy
from peft_kernels.select import NodeScorer, apply_allocation, ggm_allocate, ggm_statistics


def make_task(seed: int, n: int, shift: float = 0.0):
    return demo.make_task(seed, n, dim=32, shift=shift, warp_scale=6.0)


def mlp():
    return demo.mlp(dim=32, hidden=64)


def train(model, x, y, steps, lr, seed=0):
    demo.train(model, x, y, steps, lr, batch=128, seed=seed)


def to_svd_nodes(model, r):
    model = copy.deepcopy(model)
    for i in (0, 2, 4):
        model[i] = pk.nn.SVDNodeLinear.from_linear(model[i], r)
    return model


def finetune(base, selection, table, x, y, xt, yt, steps):
    model = copy.deepcopy(base)
    apply_allocation(model, selection, table)
    nodes = sum(m.num_nodes for m in model.modules() if isinstance(m, pk.nn.SVDNodeLinear))
    train(model, x, y, steps, 1e-2)
    return accuracy(model, xt, yt), nodes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per allocation")
    parser.add_argument("--budget", type=int, default=9, help="nodes kept trainable")
    parser.add_argument("--warmup", type=int, default=60, help="warm-up batches for the scores")
    args = parser.parse_args()
    # Matrices of 64 x 64 at most: one thread is fastest, and stays fast on a shared machine.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xa, ya = make_task(0, 6000)
    xb, yb = make_task(1, 1500, shift=2.0)
    xb_test, yb_test = make_task(2, 3000, shift=2.0)
    dense = mlp()
    train(dense, xa, ya, 600, 3e-3)
    base = to_svd_nodes(dense, r=8)
    print(f"pre-trained on task A; on task B before adapting: {accuracy(base, xb_test, yb_test):.3f}")

    # Warm-up scores at the pre-trained weights (no optimizer step), one row per batch.
    scorer = NodeScorer(base)
    g = torch.Generator().manual_seed(5)
    for _ in range(args.warmup):
        idx = torch.randint(0, len(xb), (64,), generator=g)
        base.zero_grad()
        nn.functional.cross_entropy(base(xb[idx]), yb[idx]).backward()
        scorer.step()
    base.zero_grad(set_to_none=True)
    samples, table = scorer.samples(), scorer.node_table
    print(f"{scorer.num_nodes} nodes, {scorer.steps} warm-up rows, budget {args.budget}")

    n_important = max(1, args.budget // 2)  # the paper keeps |I| = budget / 2 (30 of 60)
    ggm = ggm_allocate(samples, args.budget, n_important=n_important)
    _, mu = ggm_statistics(samples)
    top_mu = torch.argsort(mu, descending=True)[:args.budget]
    runs = [("GGM (pk.select.ggm_allocate)", ggm.selected), ("top-mu", top_mu)]
    for name, selection in runs:
        acc, nodes = finetune(base, selection, table, xb, yb, xb_test, yb_test, args.steps)
        print(f"{name:<30} nodes {nodes:>3}  task-B test accuracy {acc:.3f}")
    accs = []
    for seed in range(3):
        pick = torch.randperm(scorer.num_nodes, generator=torch.Generator().manual_seed(seed))
        accs.append(finetune(base, pick[:args.budget], table, xb, yb, xb_test, yb_test, args.steps)[0])
    print(f"{'random (mean of 3)':<30} nodes {args.budget:>3}  task-B test accuracy "
          f"{sum(accs) / len(accs):.3f}  ({', '.join(f'{a:.3f}' for a in accs)})")
    print(f"GGM: {ggm.iterations} BCD iterations, converged={ggm.converged}, I = {ggm.important.tolist()}")


if __name__ == "__main__":
    main()
