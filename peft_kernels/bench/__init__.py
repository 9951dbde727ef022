"""Benchmark registry: each op registers cases (kernel vs pure-PyTorch baseline on the same
inputs, with a correctness gate); `python -m peft_kernels bench` and benchmarks/ both run them."""
from peft_kernels.bench.registry import Case, Measured, all_cases, register

__all__ = ["Case", "Measured", "all_cases", "register"]
