"""End-to-end LoRA fine-tuning with peft_kernels on data the script makes itself.

A small MLP is pre-trained on one synthetic 10-class task, then adapted to a related task (the
class prototypes move and the input warp changes) three ways: head-only, full fine-tuning, and LoRA (r=4) through
pk.nn.LoRALinear. Prints trainable parameters and test accuracy of each; a result, not a claim.

    python examples/lora_finetune.py [--steps 300]
"""
import argparse
import copy

import torch
from torch import nn

import peft_kernels as pk
import toy_task


def make_task(seed: int, n: int, shift: float = 0.0):
    return toy_task.make_task(seed, n, dim=64, shift=shift, warp_scale=8.0)


def mlp():
    return toy_task.mlp(dim=64, hidden=256)


def train(model, x, y, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        idx = torch.randint(0, len(x), (256,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sum(p.numel() for p in params)


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return acc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    xa, ya = make_task(0, 8000)
    xb, yb = make_task(1, 2000, shift=2.0)
    xb_test, yb_test = make_task(2, 4000, shift=2.0)
    base = mlp()
    train(base, xa, ya, 2 * args.steps, 3e-3)
    print(f"pre-trained on task A; on task B before adapting: {accuracy(base, xb_test, yb_test):.3f}")

    head = copy.deepcopy(base)
    head.requires_grad_(False)
    head[4].requires_grad_(True)
    full = copy.deepcopy(base)
    lora = copy.deepcopy(base)
    # The two hidden linears (modules "0" and "2" of the Sequential) get LoRA; the rest freezes.
    pk.nn.inject_adapters(lora, ["0", "2"],
                          lambda m: pk.nn.LoRALinear.from_linear(m, r=4, alpha=8, dropout=0.05))
    lora[4].requires_grad_(True)

    for name, model, lr in (("head only", head, 3e-3), ("full fine-tuning", full, 1e-3),
                            ("LoRA r=4 (peft_kernels)", lora, 3e-3)):
        n = train(model, xb, yb, args.steps, lr)
        print(f"{name:<26} trainable {n:>7}  task-B test accuracy {accuracy(model, xb_test, yb_test):.3f}")
    plain = pk.nn.merge_and_unload(lora)  # nn.Linear layers holding W + s·B A
    print(f"LoRA after merge_and_unload() task-B test accuracy {accuracy(plain, xb_test, yb_test):.3f}")


if __name__ == "__main__":
    main()
