"""Every adapter layer inside ordinary PyTorch training machinery: activation checkpointing
(reentrant and not, LoRA dropout included), torch.export with a dynamic batch, deepcopy and
torch.save / torch.load of a model, gradient accumulation, DistributedDataParallel (gloo, two
processes) and conversion of a float32 layer to float64.

Trainable parameters are moved away from their initialisation (where every layer equals its base)
first, so a gradient or an update that went missing would show."""
import copy
import gc
import io
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import peft_kernels as pk
import peft_kernels.reference as R
from layer_table import LAYERS as SHARED_LAYERS, conv_input, linear_input, randomise_trainable

# float64 runs of one function that differ at most in summation order (a few ulps of O(1)
# values: measured <= 1.2e-15); a wrong mask, index or missing term moves results by >= 1e-3.
TOL = dict(rtol=1e-12, atol=1e-12)

LAYERS = {
    **SHARED_LAYERS,
    # Dropout large enough that a recomputed forward drawing another mask could not pass.
    "LoRALinear-dropout0.3": (lambda: pk.nn.LoRALinear.from_linear(nn.Linear(16, 12), 4,
                                                                   dropout=0.3), linear_input),
}
NAMES = list(LAYERS)


def build(name, dtype=torch.float64):
    """The table's float32 layer, trainable parameters small and random, converted to `dtype`."""
    torch.manual_seed(0)
    make, make_input = LAYERS[name]
    layer = make()
    randomise_trainable(layer, std=0.1)
    return layer.to(dtype), make_input


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def batch_of(make_input, n, seed=0, dtype=torch.float64):
    """A float64 input with batch size n: [n, in] for the linear layers, [n, C, H, W] for conv."""
    proto = make_input(dtype)
    shape = proto.shape[1:] if make_input is conv_input else proto.shape[-1:]
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def out_grad(layer, x, seed=1):
    with torch.no_grad():
        shape = layer(x).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def assert_all_close(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None and w is not None, f"{what}[{i}] missing"
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{what}[{i}]: {m}")


# ------------------------------------------------------------------------ activation checkpointing

@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", NAMES)
def test_activation_checkpointing(name, use_reentrant):
    """checkpoint(layer, x) in train mode: output and the gradients of x and every trainable
    parameter as without it. checkpoint restores torch's RNG before recomputing the forward, so
    LoRA's dropout seed (drawn from it) and hence its mask are those of the first forward."""
    layer, make_input = build(name)
    layer.train()
    params = trainable(layer)
    x0 = make_input(torch.float64)
    dy = out_grad(layer, x0)

    x = x0.clone().requires_grad_()
    torch.manual_seed(7)
    y_plain = layer(x)
    want = torch.autograd.grad(y_plain, [x, *params], dy)

    x = x0.clone().requires_grad_()
    torch.manual_seed(7)
    y_ckpt = checkpoint(layer, x, use_reentrant=use_reentrant)
    if use_reentrant:  # the reentrant variant supports .backward() only
        for p in params:
            p.grad = None
        (y_ckpt * dy).sum().backward()
        got = [x.grad, *(p.grad for p in params)]
    else:
        got = torch.autograd.grad(y_ckpt, [x, *params], dy)
    torch.testing.assert_close(y_ckpt, y_plain, **TOL)
    assert_all_close(got, want, "gradients of x and the parameters")

    if getattr(layer, "dropout", 0.0) > 0:  # the mask did act (else the test proves nothing)
        with torch.no_grad():
            assert not torch.allclose(y_plain, layer.eval()(x0))


# --------------------------------------------------------------------------------- torch.export

@pytest.mark.parametrize("name", NAMES)
def test_export_with_dynamic_batch(name):
    layer, make_input = build(name)
    layer.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(layer, (batch_of(make_input, 5),), dynamic_shapes=({0: batch},))
    module = exported.module()
    for n in (3, 7):
        x = batch_of(make_input, n, seed=n)
        with torch.no_grad():
            got, want = module(x), layer(x)
        assert got.shape == want.shape and got.shape[0] == n
        torch.testing.assert_close(got, want, **TOL)


# ----------------------------------------------------------------- deepcopy, torch.save, load

def save_and_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def forward_backward(model, x, dy):
    """Train-mode output and gradients (x first, then the trainable parameters), dropout seeded."""
    x = x.clone().requires_grad_()
    torch.manual_seed(11)
    y = model(x)
    return y.detach(), torch.autograd.grad(y, [x, *trainable(model)], dy)


@pytest.mark.parametrize("copy_with", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", NAMES)
def test_copied_model_is_identical_and_independent(name, copy_with):
    layer, make_input = build(name)
    model = nn.Sequential(layer, nn.Tanh()).train()
    other = copy.deepcopy(model) if copy_with == "deepcopy" else save_and_load(model)
    assert type(other[0]) is type(layer)
    assert [(n, p.requires_grad) for n, p in other.named_parameters()] == \
        [(n, p.requires_grad) for n, p in model.named_parameters()]
    assert list(other.state_dict()) == list(model.state_dict())
    originals = {t.data_ptr() for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    assert not any(t.data_ptr() in originals for t in other.state_dict().values()
                   if isinstance(t, torch.Tensor))
    x = make_input(torch.float64)
    dy = out_grad(model, x)
    y, grads = forward_backward(model, x, dy)
    y_other, grads_other = forward_backward(other, x, dy)
    assert torch.equal(y_other, y)
    assert all(torch.equal(a, b) for a, b in zip(grads_other, grads))
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_orthogonal_conv_state_dict_into_a_fresh_layer():
    # The other layers' state_dict round trips are in their own test files.
    layer, _ = build("OrthogonalConv2d")
    layer.merge()
    fresh = pk.nn.OrthogonalConv2d.from_conv(nn.Conv2d(8, 6, 3, dtype=torch.float64), 4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    x = conv_input(torch.float64)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
        fresh.unmerge(), layer.unmerge()
        torch.testing.assert_close(fresh(x), layer(x), **TOL)
        assert torch.equal(fresh.oft_params, layer.oft_params)


# ----------------------------------------------------------------------- gradient accumulation

@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation(name):
    """Two backward passes add into .grad (of x and of every trainable parameter) the sum of the
    two gradients taken separately, and leave those separate gradients as they were."""
    layer, make_input = build(name)
    layer.train()
    params = trainable(layer)
    x = make_input(torch.float64).requires_grad_()
    dys = [out_grad(layer, x, seed=s) for s in (1, 2)]

    def separate(i):
        torch.manual_seed(20 + i)
        return torch.autograd.grad(layer(x), [x, *params], dys[i])

    first, second = separate(0), separate(1)
    for i in (0, 1):
        torch.manual_seed(20 + i)
        layer(x).backward(dys[i])
    assert_all_close([x.grad, *(p.grad for p in params)],
                     [a + b for a, b in zip(first, second)], "accumulated gradients")
    assert_all_close(separate(0), first, "a separate gradient taken again")


# ----------------------------------------------------------------------- float32 -> float64

def float64_reference(layer):
    """The same function in float64 without the layer: its merged plain module, or (for an
    adapter with an activation, which does not merge) the pure-PyTorch reference op."""
    if isinstance(layer, pk.nn.LoRALinear) and layer.activation is not None:
        w, b = layer.base.weight, layer.base.bias
        return lambda x: R.lora_linear(x, w, layer.lora_A, layer.lora_B, scaling=layer.scaling,
                                       bias=b, activation=layer.activation, training=False)
    return pk.nn.merge_and_unload(copy.deepcopy(layer))


@pytest.mark.parametrize("convert", ["to", "double"])
@pytest.mark.parametrize("name", NAMES)
def test_float32_layer_converted_to_float64(name, convert):
    layer, make_input = build(name, dtype=torch.float32)
    layer = layer.to(torch.float64) if convert == "to" else layer.double()
    floating = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float64 for t in floating)
    layer.eval()
    reference = float64_reference(layer)
    x = make_input(torch.float64).requires_grad_()
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    xr = x.detach().requires_grad_()
    yr = reference(xr)
    (dxr,) = torch.autograd.grad(yr, xr, torch.ones_like(yr))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, yr, **TOL)
    torch.testing.assert_close(dx, dxr, **TOL)


# ------------------------------------------------------------------- DistributedDataParallel

DDP_TIMEOUT_S = 120  # the whole test, spawn included; each child's collectives time out at 60 s


def _ddp_model():
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64)
    model = nn.Sequential(nn.Linear(8, 16, **kw), nn.Tanh(), nn.Linear(16, 4, **kw))
    mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(2)) < 0.3
    pk.nn.inject_adapters(model, ["0", "2"], lambda m: (
        pk.nn.LoRALinear.from_linear(m, 2) if m.in_features == 8
        else pk.nn.SparseDeltaLinear.from_mask(m, mask)))
    randomise_trainable(model, std=0.1)
    return model


def _ddp_shard(rank, per_rank=4):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g,
                                                                            dtype=torch.float64)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[rows], t[rows]


def _ddp_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        model = _ddp_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, t = _ddp_shard(rank)
        F.mse_loss(ddp(x), t).backward()
        torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                   f"{out_dir}/rank{rank}.pt")
        # A DDP wrapper (its reducer) still alive at interpreter exit aborts the process now and
        # then (SIGABRT, "terminate called without an active exception"; torch 2.13, with plain
        # nn.Linear models too: ~1 run in 10). Released before the group goes: 0 in 105 runs.
        del ddp
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_gloo(tmp_path):
    """Two CPU processes, one data shard each: after one backward every rank holds, for each
    trainable parameter (LoRA's A and B, the sparse values), the mean of the two shards'
    single-process gradients."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    world_size = 2
    context = mp.start_processes(_ddp_worker, args=(world_size, _free_port(), str(tmp_path)),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + DDP_TIMEOUT_S
    try:
        while not context.join(timeout=1):  # raises with the child's traceback if one fails
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {DDP_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()

    model = _ddp_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["0.lora_A", "0.lora_B", "2.values"]
    shards = []
    for rank in range(world_size):
        x, t = _ddp_shard(rank)
        shards.append(torch.autograd.grad(F.mse_loss(model(x), t), trainable(model)))
    want = [sum(g) / world_size for g in zip(*shards)]
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got) == names
        assert all(g.abs().max() > 0 for g in got.values())
        assert_all_close(list(got.values()), want, f"rank {rank} gradients")
