"""The small synthetic classification task the examples fine-tune on (no download needed):
Gaussian class prototypes through a fixed nonlinear warp, and a 3-layer MLP for it. A `shift`
moves the prototypes, making a related downstream task for the pretrained model."""
import torch
from torch import nn


def make_task(seed: int, n: int, dim: int, classes: int = 10, shift: float = 0.0,
              warp_scale: float = 8.0):
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(classes, dim, generator=g) * 2.0
    if shift:
        protos = protos + shift * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + torch.randn(n, dim, generator=g) * 3.0
    # A fixed nonlinear warp makes the task need the hidden layers.
    warp = torch.randn(dim, dim, generator=torch.Generator().manual_seed(7 + int(shift > 0)))
    return torch.tanh(x @ warp / warp_scale), y


def mlp(dim: int, hidden: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, classes))
