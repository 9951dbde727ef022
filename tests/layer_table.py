"""One instance of every adapter layer of the package, for the tests that run each through the
same checks (test_cpu_half.py, test_layers_cuda.py, test_integration.py): name -> (factory, input
maker). The factories build float32 layers on fresh float32 bases; the input makers take a
dtype."""
import torch
from torch import nn

import peft_kernels as pk


def randomise_trainable(module, seed=0, std=0.3):
    """Adapters start at zero or the identity; give them values so every gradient is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def forward_backward(layer, x, dy):
    """The layer's output, the input's gradient and the trainable parameters' gradients for
    the output gradient dy (the dropout seed fixed: the same mask on every call)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(5)
    y = layer(x)
    y.backward(dy.to(y.dtype))
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y, x.grad, grads


def linear_input(dtype):
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)


def conv_input(dtype):
    return torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(1)).to(dtype)


LAYERS = {
    "LoRALinear": (lambda: pk.nn.LoRALinear.from_linear(nn.Linear(16, 12), 4, dropout=0.1),
                   linear_input),
    "LoRALinear-gelu": (lambda: pk.nn.LoRALinear.from_linear(nn.Linear(16, 12), 4,
                                                             activation="gelu"), linear_input),
    "SparseDeltaLinear": (lambda: pk.nn.SparseDeltaLinear.from_mask(
        nn.Linear(16, 12), torch.rand(12, 16, generator=torch.Generator().manual_seed(2)) < 0.2),
        linear_input),
    "LieLinear": (lambda: pk.nn.LieLinear.from_linear(nn.Linear(16, 12), 4), linear_input),
    "LieConv2d": (lambda: pk.nn.LieConv2d.from_conv(nn.Conv2d(8, 6, 3, padding=1), 4), conv_input),
    "OrthogonalLinear": (lambda: pk.nn.OrthogonalLinear.from_linear(nn.Linear(16, 12), 4),
                         linear_input),
    "OrthogonalConv2d": (lambda: pk.nn.OrthogonalConv2d.from_conv(nn.Conv2d(8, 6, 3), 4),
                         conv_input),
    "SVDNodeLinear": (lambda: pk.nn.SVDNodeLinear.from_linear(nn.Linear(16, 12), r=3),
                      linear_input),
}
