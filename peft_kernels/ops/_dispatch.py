"""The ops' registration: a torch.library custom op (fake kernel, registered autograd; what
torch.compile, opcheck, FakeTensor and functorch see) with a direct eager path beside it.

Going through the torch.library dispatch costs about 100 µs of Python per call (argument
normalisation, the autograd wrapper, redispatch): a LoRA forward + backward measured 416-477 µs
that way against 213-227 µs calling the same C++ entry points from a torch.autograd.Function
(3-line layer on 4 x 16 inputs, CPU). On a GPU that host time is the step time of small and
medium layers. So a call made eagerly on plain tensors runs the op's own implementation, with
the same setup_context and backward, as an autograd.Function; everything else (compiling,
tracing, a dispatch mode, a tensor subclass, a functorch transform, a torch-function mode) goes
through the registered op.

torch.autocast: inside an autocast region an op's implementation runs with autocast off (the
C++ code's own ATen calls, float32 accumulations among them, must not be recast), and the
Linear-shaped ops first cast their floating-point inputs to the region's dtype, as F.linear and
F.conv2d do there: a layer then takes the lower-precision activations of the layers before it
beside its float32 parameters, and gradients reach those parameters in float32 through the casts.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain(arg) -> bool:
    kind = type(arg)
    if kind in _PLAIN_TENSORS:
        # The kernels read CPU or CUDA memory; meta tensors (shapes only) and other devices
        # go to the fake kernel or the dispatcher's error.
        return arg.is_cpu or arg.is_cuda
    if isinstance(arg, torch.Tensor):  # a subclass: FakeTensor, DTensor, ...
        return False
    if kind is list or kind is tuple:
        return all(_plain(a) for a in arg)
    return True


def direct_call_ok(args) -> bool:
    """Whether `args` may go straight to the C++ kernels: eager, plain tensors, nothing
    intercepting the call."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(_plain(a) for a in args)


class Op:
    """A custom op `name` implemented by `fn` (schema from its annotations) that eager calls on
    plain tensors run directly. Use as a decorator; register_fake and register_autograd as for
    torch.library.custom_op."""

    def __init__(self, name: str, fn: Callable, cast_under_autocast: bool):
        self.name = name
        self.fn = fn
        self.cast_under_autocast = cast_under_autocast
        self.op = torch.library.custom_op(name, fn, mutates_args=())
        self._function = None  # the autograd.Function of the direct path, once registered

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        # The ctx-first forward: with a separate setup_context, Function.apply binds the
        # signature of forward on every call (~60 µs).
        def forward(ctx, *args):
            output = fn(*args)
            setup_context(ctx, args, output)
            return output

        # grad_fn then reads "<op>Backward".
        Direct = type(self.name.split("::")[-1], (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(once_differentiable(backward))})
        self._function = Direct

    def __call__(self, *args):
        device_type = args[0].device.type  # every op's first argument is a tensor
        if torch.is_autocast_enabled(device_type):
            if self.cast_under_autocast:
                dtype = torch.get_autocast_dtype(device_type)
                args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                             else a for a in args)
            with torch.autocast(device_type, enabled=False):
                return self._call(args)
        return self._call(args)

    def _call(self, args):
        if direct_call_ok(args):
            return self._function.apply(*args) if self._function is not None else self.fn(*args)
        return self.op(*args)


def custom_op(name: str, *, cast_under_autocast: bool = False) -> Callable[[Callable], Op]:
    """``@custom_op("peft_kernels::name")``: torch.library.custom_op (no mutated arguments) with
    the direct eager path of :class:`Op`. Under torch.autocast the op runs with autocast off,
    after casting its floating-point tensor arguments to the autocast dtype when
    ``cast_under_autocast`` (the Linear-shaped ops, like F.linear)."""
    return lambda fn: Op(name, fn, cast_under_autocast)


_HALF_TYPES = (torch.float16, torch.bfloat16)


def cpu_half_in_float32(fn: Callable, *args, floating: tuple[int, ...],
                        float32_outputs: tuple[int, ...] = ()):
    """``fn(*args)`` for an op whose CPU kernels take float32 and float64: float16 / bfloat16 CPU
    tensors are computed in float32. When the tensors at positions ``floating`` (None allowed,
    the first one present) are CPU tensors of one half dtype, they go in converted to float32 (a
    copy per call) and the results come back in that dtype, except those at ``float32_outputs``
    (float32 in the op's contract, as its fake kernel says). Anything else, CUDA tensors,
    float32 / float64 or mixed dtypes (which the op rejects with a message naming the argument),
    calls ``fn`` as it is."""
    first = args[floating[0]]
    half = first.dtype
    if half not in _HALF_TYPES or first.device.type != "cpu":
        return fn(*args)
    if any(args[i] is not None and (args[i].dtype != half or args[i].device.type != "cpu")
           for i in floating):
        return fn(*args)
    args = list(args)
    for i in floating:
        if args[i] is not None:
            args[i] = args[i].float()
    out = fn(*args)
    if isinstance(out, torch.Tensor):
        return out.to(half)
    return tuple(o if i in float32_outputs else o.to(half) for i, o in enumerate(out))
