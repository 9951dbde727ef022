"""The direct eager path of the ops (peft_kernels/ops/_dispatch.py) against the registered
torch.library op: the same outputs and gradients bit for bit, and each path really taken."""
import contextlib

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


def _lie_conv(device):  # list arguments (stride, padding, dilation) besides the tensors
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    W = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    A = torch.randn(2, 18, generator=g, dtype=torch.float64)
    B = torch.randn(6, 2, generator=g, dtype=torch.float64)
    W = W.to(device)
    return ((lambda x, A, B: pk.ops.lie_conv2d(x, W, A, B, padding=1, stride=(2, 1), groups=2,
                                               scaling=0.7)),
            [t.to(device) for t in (x, A, B)])


CASES = {"lora_linear": (_lora, "lora_linear_fwd"),
         "sparse_delta_linear": (_sparse, "sparse_delta_linear_fwd"),
         "expm": (_expm, "expm_fwd"), "lie_linear": (_lie, "lie_linear"),
         "lie_conv2d": (_lie_conv, "lie_conv2d")}


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


@pytest.mark.parametrize("registered", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_double_backward_is_refused(case, registered):
    # The backward kernels have no derivative: a gradient taken with create_graph=True raises
    # when differentiated again, on the direct path and through the registered op alike (there
    # it used to come back as a constant, so a gradient penalty silently added nothing).
    run, inputs = CASES[case][0]("cpu")
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with PassThrough() if registered else contextlib.nullcontext():
        out = run(*leaves)
        y = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            sum(g.square().sum() for g in grads).backward()


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


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("call, exc, text", [
    (lambda: pk.ops.lora_linear(_meta(4, 5), _meta(7, 4), _meta(3, 5), _meta(7, 3)),
     ValueError, r"weight must have shape \[out_features, in_features\], got \(7, 4\)"),
    (lambda: pk.ops.lora_linear(_meta(4, 5), _meta(7, 5), _meta(3, 5), _meta(7, 2)),
     ValueError, r"lora_B must have shape \[out_features, r\]"),
    (lambda: pk.ops.lora_linear(_meta(4, 5), _meta(7, 5), _meta(3, 5), _meta(7, 3), bias=_meta(6)),
     ValueError, r"bias must have shape \[out_features\]"),
    (lambda: pk.ops.lora_linear(_meta(4, 5), _meta(7, 5), _meta(3, 5), _meta(7, 3, dtype=torch.float64)),
     TypeError, "lora_B has dtype torch.float64 but x has torch.float32"),
    (lambda: pk.ops.sparse_delta_linear(_meta(4, 5), _meta(7, 5), _meta(3), _meta(3)),
     TypeError, "indices must be int64 or int32"),
    (lambda: pk.ops.sparse_delta_linear(_meta(4, 5), _meta(7, 5), _meta(3, dtype=torch.int64), _meta(2)),
     ValueError, "values must have shape"),
    (lambda: pk.ops.expm(_meta(3, 3, dtype=torch.int64)), TypeError, "A must be float32"),
    (lambda: pk.ops.truncated_svd(_meta(3, 3, dtype=torch.int32), 2), TypeError, "A must be float32"),
    (lambda: pk.ops.block_rotate(_meta(2, 10), _meta(3, 4, 4)), ValueError, "must equal k \\* b"),
    (lambda: pk.ops.lie_weight(_meta(6, 4), _meta(2, 5), _meta(6, 2)), ValueError, "lora_A must have shape"),
    (lambda: pk.ops.lie_linear(_meta(3, 4), _meta(6, 4), _meta(2, 4), _meta(5, 2)),
     ValueError, "lora_B must have shape"),
    (lambda: pk.ops.lie_conv2d(_meta(1, 4, 5, 5), _meta(6, 4, 3), _meta(2, 36), _meta(6, 2)),
     ValueError, "weight must have shape"),
])
def test_fake_kernels_check_what_the_kernels_check(call, exc, text):
    # Shapes-only calls (meta tensors; torch.compile's tracing) refuse what the C++ side refuses,
    # instead of answering with a shape.
    with pytest.raises(exc, match=text):
        call()


@pytest.mark.parametrize("call, text", [
    (lambda: pk.ops.lora_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(1, 3),
                                torch.randn(4, 1), dropout_p=0.1, seed=5),
     "seed must be a torch.Tensor or None, got int"),
    (lambda: pk.ops.lora_linear([[1.0]], torch.randn(4, 1), torch.randn(1, 1), torch.randn(4, 1)),
     "x must be a torch.Tensor, got list"),
    (lambda: pk.ops.sparse_delta_linear(torch.randn(2, 3), torch.randn(4, 3), [1, 2], torch.randn(2)),
     "indices must be a torch.Tensor, got list"),
    (lambda: pk.ops.lie_linear(torch.randn(2, 3), torch.randn(4, 3), "A", torch.randn(4, 1)),
     "lora_A must be a torch.Tensor, got str"),
    (lambda: pk.ops.block_rotate(torch.randn(2, 4), None), "rotations must be a torch.Tensor"),
    (lambda: pk.ops.rotated_linear(torch.randn(2, 8), torch.randn(3, 8),
                                   torch.eye(4).expand(2, 4, 4).long()),
     "rotations has dtype torch.int64 but weight has torch.float32"),
    (lambda: pk.ops.truncated_svd(torch.randn(4, 4), None), "k must be an int, got NoneType"),
])
def test_arguments_that_are_not_tensors(call, text):
    with pytest.raises(TypeError, match=text):
        call()


def test_rotated_linear_shapes_name_the_argument():
    R = torch.eye(4).expand(2, 4, 4).contiguous()
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 8\]"):
        pk.ops.rotated_linear(torch.randn(2, 7), torch.randn(3, 8), R)
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        pk.ops.rotated_linear(torch.randn(2, 8), torch.randn(3, 8), R, torch.randn(4))
    with pytest.raises(ValueError, match=r"rotations must have shape \[k, b, b\]"):
        pk.ops.rotated_linear(torch.randn(2, 8), torch.randn(3, 8), R[:, :, :3])
