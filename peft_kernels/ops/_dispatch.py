"""The ops' registration: a torch.library custom op (fake kernel, registered autograd; what
torch.compile, opcheck, FakeTensor and functorch see) with a direct eager path beside it.

Going through the torch.library dispatch costs about 100 µs of Python per call (argument
normalisation, the autograd wrapper, redispatch): a LoRA forward + backward measured 416-477 µs
that way against 213-227 µs calling the same C++ entry points from a torch.autograd.Function
(3-line layer on 4 x 16 inputs, CPU). On a GPU that host time is the step time of small and
medium layers. So a call made eagerly on plain tensors runs the op's own implementation, with
the same setup_context and backward, as an autograd.Function (or, when no gradient can be asked
of it, the implementation alone); everything else (compiling,
tracing, a dispatch mode, a tensor subclass, a torch-function mode) goes through the registered
op.

torch.func transforms: the registered op's autograd is not in the form they take, so under
grad / vjp / jacrev / vmap alone the op runs as an autograd.Function with a separate
setup_context, whose vmap rule calls the op once per batch entry. Forward mode (jvp, jacfwd,
hessian) is not implemented and says so.

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
_SCALARS = (float, int, bool, str, type(None))
# One check for every device type (~70 ns, against ~600 ns for a tensor's device type and its
# autocast state); where torch lacks it, every call takes the per-device check.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_is_functorch_wrapper = torch._C._functorch.is_functorch_wrapped_tensor


def _plain(arg, wrapped_ok: bool = False) -> bool:
    kind = type(arg)
    if kind in _SCALARS:  # first: isinstance(arg, torch.Tensor) below costs ~100 ns
        return True
    if kind in _PLAIN_TENSORS:
        # The kernels read CPU or CUDA memory; meta tensors (shapes only) and other devices
        # go to the fake kernel or the dispatcher's error. A torch.func wrapper (no storage;
        # e.g. saved by a vjp whose transform has returned) goes to the dispatcher, which
        # unwraps it.
        return ((arg.is_cpu or arg.is_cuda)
                and (wrapped_ok or not _is_functorch_wrapper(arg)))
    if isinstance(arg, torch.Tensor):  # a subclass: FakeTensor, DTensor, ...
        return False
    if kind is list or kind is tuple:
        return all(_plain(a, wrapped_ok) for a in arg)
    return True


def _no_interception() -> bool:
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._is_torch_function_mode_enabled())


def direct_call_ok(args) -> bool:
    """Whether `args` may go straight to the C++ kernels: eager, plain tensors, nothing
    intercepting the call."""
    if not _no_interception() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(_plain(a) for a in args)


def functorch_call_ok(args) -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is all that intercepts the call:
    then the op runs as an autograd.Function in the form those transforms take (a registered
    custom op's autograd is not)."""
    return (torch._C._functorch.peek_interpreter_stack() is not None and _no_interception()
            and all(_plain(a, wrapped_ok=True) for a in args))


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
        # The same for torch.func transforms; until an autograd formula is registered, one for
        # the backward kernels, which transforms reach with their tensors wrapped (no data
        # pointer) and which only an autograd.Function's forward sees unwrapped.
        self._functorch_function = self._function_class(fn, _setup_nothing, self._no_derivative)

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        # The backward kernels have no derivative: under create_graph=True the gradients must
        # raise when differentiated, not pass for constants (on every path alike).
        self.op.register_autograd(once_differentiable(backward), setup_context=setup_context)
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
        self._functorch_function = self._function_class(fn, setup_context, backward)

    def _function_class(self, forward, setup_context, backward):
        """An autograd.Function in the form torch.func takes (no ctx in forward)."""
        return type(self.name.split("::")[-1], (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "vmap": staticmethod(self._vmap_by_loop)})

    def _vmap_by_loop(self, info, in_dims, *args):
        """torch.func.vmap's rule: the op once per batch entry, results stacked (correct for
        every op and argument; one call per entry, so per-sample work costs a call each)."""
        # (A list argument, such as a stride, comes with a list of None as its in_dim.)
        outputs = [self(*(a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                          for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        if isinstance(outputs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outputs)), (0,) * len(outputs[0])
        return torch.stack(outputs), 0

    def _no_derivative(self, ctx, *grads):
        raise RuntimeError(f"{self.name} has no derivative: it is a backward kernel, so the "
                           "ops are once differentiable")

    def __call__(self, *args):
        if _any_autocast():
            device_type = args[0].device.type  # every op's first argument is a tensor
            # (The kernels' devices; autocast has no state for others, meta among them.)
            if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
                return self._call_in_autocast(args, device_type)
        return self._call(args)

    def _call_in_autocast(self, args, device_type: str):
        if self.cast_under_autocast:
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                         else a for a in args)
        with torch.autocast(device_type, enabled=False):
            return self._call(args)

    def _call(self, args):
        if direct_call_ok(args):
            if self._function is not None and _grad_needed(args):
                return self._function.apply(*args)
            # No gradient will be asked of this call (inference, no_grad, frozen inputs): the
            # autograd.Function's bookkeeping would cost ~4 µs of the ~12 µs of a small call.
            return self.fn(*args)
        if functorch_call_ok(args):
            return self._functorch_function.apply(*args)
        return self.op(*args)


def _grad_needed(args) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _setup_nothing(ctx, inputs, output):
    pass


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
