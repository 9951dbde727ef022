"""Loads the compiled extension peft_kernels._C lazily, with one clear error when it is missing."""
from __future__ import annotations

import importlib
from typing import Any

_module = None
_load_error: BaseException | None = None

_HOW_TO_BUILD = (
    "Build it from the source tree with torch and pybind11 already installed: "
    "`pip install --no-build-isolation .` (or `-e .` for development). "
    "Set PEFT_KERNELS_CUDA=ON to require the CUDA kernels."
)


class ExtensionNotBuiltError(RuntimeError):
    """peft_kernels._C could not be imported."""


def C() -> Any:
    """The compiled module; raises ExtensionNotBuiltError saying what to do if it is missing."""
    global _module, _load_error
    if _module is None:
        if _load_error is None:
            try:
                _module = importlib.import_module("peft_kernels._C")
            except ImportError as err:  # missing file, ABI mismatch, unresolved symbol, ...
                _load_error = err
        if _module is None:
            raise ExtensionNotBuiltError(
                f"peft_kernels' compiled extension could not be loaded ({_load_error}). {_HOW_TO_BUILD}"
            ) from _load_error
    return _module


def build_info() -> dict:
    """version, torch, cuda (bool: CUDA kernels compiled), cuda_version, archs, cpu_isa (the
    SIMD level the CPU kernels use here: "avx512", "avx2" or "generic"; the environment variable
    PEFT_KERNELS_CPU_ISA=avx2|generic caps it), ops."""
    info = dict(C().build_info())
    info["ops"] = list(info["ops"])
    return info
