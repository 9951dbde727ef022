"""End-to-end LoRA fine-tuning with peft_kernels on data the script makes itself.

A small MLP is pre-trained on one synthetic 10-class task, then adapted to a related task (the
class prototypes move and the input warp changes) three ways: head-only, full fine-tuning, and LoRA (r=4) through
pk.nn.LoRALinear. Prints trainable parameters and test accuracy of each; a result, not a claim.

    python examples/lora_finetune.py [--steps 300]
"""
import argparse
import copy

import torch

import peft_kernels as pk
from peft_kernels.demo import accuracy, make_task, mlp, train, trainable_count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    xa, ya = make_task(0, 8000, dim=64)
    xb, yb = make_task(1, 2000, dim=64, shift=2.0)
    xb_test, yb_test = make_task(2, 4000, dim=64, shift=2.0)
    base = mlp(dim=64, hidden=256)
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
        train(model, xb, yb, args.steps, lr)
        n = trainable_count(model)
        print(f"{name:<26} trainable {n:>7}  task-B test accuracy {accuracy(model, xb_test, yb_test):.3f}")
    plain = pk.nn.merge_and_unload(lora)  # nn.Linear layers holding W + s·B A
    print(f"LoRA after merge_and_unload() task-B test accuracy {accuracy(plain, xb_test, yb_test):.3f}")


if __name__ == "__main__":
    main()
