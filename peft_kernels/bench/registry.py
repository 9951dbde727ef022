from __future__ import annotations

import contextlib
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# Modules that register cases on import; a new op adds its module here.
CASE_MODULES = ["peft_kernels.bench.lora_linear", "peft_kernels.bench.expm",
                "peft_kernels.bench.sparse_delta_linear", "peft_kernels.bench.lie",
                "peft_kernels.bench.truncated_svd", "peft_kernels.bench.select_ggm"]


@dataclass
class Measured:
    """What a case's setup returns: callables over inputs already on the device."""

    kernel: Callable[[], object]
    baseline: Callable[[], object]
    error: Callable[[], float]  # relative max error of the kernel vs a float64 reference
    tolerance: float  # the correctness gate for `error`
    floor: Optional[Callable[[], object]] = None  # the physical floor (e.g. the frozen base layer)
    # The baseline's own error by the same measure, where it is approximate too (reported
    # side by side; not a gate).
    baseline_error: Optional[Callable[[], float]] = None


@dataclass
class Case:
    name: str
    op: str
    device: str
    setup: Callable[[], Measured]
    baseline_name: str = "pure PyTorch"
    floor_name: str = ""
    quick: bool = True  # part of the default `bench` run
    warmup: int = 1  # untimed calls of each function before timing (after the error gate's call)
    max_reps: Optional[int] = None  # cap on timed repetitions (cases whose baseline takes minutes)
    # Peak memory takes one more call of each function (under the profiler on the CPU); off for
    # cases about time alone whose baseline takes seconds.
    measure_memory: bool = True
    notes: str = ""
    tags: dict = field(default_factory=dict)


_REGISTRY: list[Case] = []


def register(case: Case) -> Case:
    if any(c.name == case.name and c.device == case.device for c in _REGISTRY):
        raise ValueError(f"benchmark case {case.name!r} on {case.device} registered twice")
    _REGISTRY.append(case)
    return case


def all_cases() -> list[Case]:
    for module in CASE_MODULES:
        importlib.import_module(module)
    return list(_REGISTRY)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, *, warmup: int = 2,
                     reps: int = 10, min_time_s: float = 0.0) -> dict[str, float]:
    """Median milliseconds of each function, run round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rep = 0
    while rep < reps or time.perf_counter() - start < min_time_s:
        for key, fn in fns.items():
            if device.startswith("cuda"):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                samples[key].append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[key].append((time.perf_counter() - t0) * 1e3)
        rep += 1
    return {k: statistics.median(v) for k, v in samples.items()}


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the duration (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory allocated during fn beyond what was allocated before, in MiB: on CUDA from the
    caching allocator's statistics, on CPU from the profiler's record of every CPU allocation
    (its running total of the bytes allocated since profiling began)."""
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side logs every start and stop to fd 2
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(totals, default=0) / 2**20


def relative_max_error(got, want) -> float:
    """max |got - want| / max |want| over matching tensors (float64 comparison)."""
    if isinstance(got, torch.Tensor):
        got, want = [got], [want]
    worst = 0.0
    for g, w in zip(got, want):
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        scale = max(w.abs().max().item(), 1e-30) if w.numel() else 1.0
        worst = max(worst, (g - w).abs().max().item() / scale if w.numel() else 0.0)
    return worst
