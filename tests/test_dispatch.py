"""The direct eager path of the ops (peft_kernels/ops/_dispatch.py) against the registered
torch.library op: the same outputs and gradients bit for bit, and each path really taken."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peft_kernels as pk


class PassThrough(TorchDispatchMode):
    """Changes nothing; its presence sends calls through the registered custom ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _lora(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    W = torch.randn(12, 16, generator=g, dtype=torch.float64)
    A = torch.randn(4, 16, generator=g, dtype=torch.float64)
    B = torch.randn(12, 4, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    seed = torch.tensor([11])
    inputs = [t.to(device) for t in (x, A, B, b)]
    fixed = [W.to(device), seed.to(device)]

    def run(x, A, B, b):
        return pk.ops.lora_linear(x, fixed[0], A, B, bias=b, scaling=0.5, dropout_p=0.25,
                                  activation="gelu", seed=fixed[1])
    return run, inputs


def _sparse(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 20, generator=g, dtype=torch.float64)
    W = torch.randn(9, 20, generator=g, dtype=torch.float64)
    idx = torch.randperm(180, generator=g)[:6].sort().values
    v = torch.randn(6, generator=g, dtype=torch.float64)
    W, idx = W.to(device), idx.to(device)
    return (lambda x, v: pk.ops.sparse_delta_linear(x, W, idx, v)), [x.to(device), v.to(device)]


def _expm(device):
    A = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return pk.ops.expm, [A.to(device)]


def _lie(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 10, generator=g, dtype=torch.float64)
    W = torch.randn(8, 10, generator=g, dtype=torch.float64)
    A = torch.randn(2, 10, generator=g, dtype=torch.float64)
    B = torch.randn(8, 2, generator=g, dtype=torch.float64)
    W = W.to(device)
    return ((lambda x, A, B: pk.ops.lie_linear(x, W, A, B, scaling=0.7)),
            [t.to(device) for t in (x, A, B)])


CASES = {"lora_linear": (_lora, "lora_linear_fwd"),
         "sparse_delta_linear": (_sparse, "sparse_delta_linear_fwd"),
         "expm": (_expm, "expm_fwd"), "lie_linear": (_lie, "lie_linear")}


def _forward_backward(run, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = run(*leaves)
    y = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    return y.detach(), grads, type(y.grad_fn).__name__


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_path_equals_registered_op(device, case):
    make, op_name = CASES[case]
    run, inputs = make(device)
    y_direct, g_direct, fn_direct = _forward_backward(run, inputs)
    with PassThrough():
        y_op, g_op, fn_op = _forward_backward(run, inputs)
    assert fn_direct == f"{op_name}Backward"
    assert fn_op != fn_direct  # the mode really sent the call through torch.library
    assert torch.equal(y_direct, y_op)
    for a, b in zip(g_direct, g_op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_calls_that_need_no_gradient_skip_the_autograd_function(case, monkeypatch):
    # Under no_grad, or with no input requiring grad, the implementation runs without the
    # autograd.Function (its bookkeeping costs ~4 µs a call): same output, no graph.
    make, _ = CASES[case]
    run, inputs = make("cpu")
    want = run(*inputs)
    want = want[0] if isinstance(want, tuple) else want
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def refuse(*args):
        raise AssertionError("autograd.Function used")

    for op in _all_ops():
        monkeypatch.setattr(op._function, "apply", refuse)
    for call in (lambda: run(*inputs), lambda: _no_grad(run, leaves)):
        got = call()
        got = got[0] if isinstance(got, tuple) else got
        assert got.grad_fn is None and not got.requires_grad
        assert torch.equal(got, want)


def _no_grad(run, args):
    with torch.no_grad():
        return run(*args)


def _all_ops():
    import importlib
    import pkgutil

    from peft_kernels.ops._dispatch import Op
    ops = []
    for info in pkgutil.iter_modules(pk.ops.__path__):
        module = importlib.import_module(f"peft_kernels.ops.{info.name}")
        ops += [v for v in vars(module).values() if isinstance(v, Op) and v._function]
    assert len(ops) >= 5
    return ops


def test_direct_path_refuses_double_backward():
    run, inputs = _expm("cpu")
    A = inputs[0].requires_grad_()
    (g,) = torch.autograd.grad(run(A).sum(), A, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_tensors_take_the_fake_kernel(case):
    # Meta tensors have shapes but no memory: they must never reach the C++ kernels.
    make, _ = CASES[case]
    run, inputs = make("cpu")
    want = run(*inputs)
    run_meta, inputs_meta = make("meta")
    got = run_meta(*inputs_meta)
    assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype


def _first_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_func_grad_and_vjp(device, case):
    """torch.func's reverse mode runs the ops as autograd.Functions of its own form: the same
    gradients as eager autograd, also from a vjp function called after its transform returned."""
    make, _ = CASES[case]
    run, inputs = make(device)
    _, want, _ = _forward_backward(run, inputs)
    y, vjp_fn = torch.func.vjp(lambda *t: _first_output(run(*t)), *inputs)
    got = vjp_fn(torch.ones_like(y))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    got = torch.func.grad(lambda *t: _first_output(run(*t)).sum(),
                          argnums=tuple(range(len(inputs))))(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_func_vmap_jacrev_and_per_sample_grads(case):
    make, _ = CASES[case]
    run, inputs = make("cpu")
    f = lambda *t: _first_output(run(*t))
    # vmap over the first input's leading dimension: one call per entry.
    got = torch.func.vmap(f, in_dims=(0,) + (None,) * (len(inputs) - 1))(*inputs)
    want = torch.stack([f(inputs[0][i], *inputs[1:]) for i in range(inputs[0].shape[0])])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # jacrev (vmap over the backward) against autograd's row-by-row Jacobian.
    last = len(inputs) - 1
    jac = torch.func.jacrev(f, argnums=last)(*inputs)
    want = torch.autograd.functional.jacobian(lambda t: f(*inputs[:-1], t), inputs[-1])
    torch.testing.assert_close(jac, want, rtol=1e-12, atol=1e-12)
    # per-sample gradients (vmap of grad, as differentially private training takes them)
    loss = lambda first, *rest: f(first, *rest).square().sum()
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=last),
                                 in_dims=(0,) + (None,) * last)(*inputs)
    want = torch.stack([torch.func.grad(loss, argnums=last)(inputs[0][i], *inputs[1:])
                        for i in range(inputs[0].shape[0])])
    torch.testing.assert_close(per_sample, want, rtol=1e-12, atol=1e-12)


def test_forward_mode_is_refused_clearly():
    run, inputs = _lie("cpu")
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jacfwd(run, argnums=1)(*inputs)
