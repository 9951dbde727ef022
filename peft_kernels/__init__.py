"""peft_kernels: C++/CUDA kernels and drop-in layers for parameter-efficient fine-tuning."""
from peft_kernels._version import __version__
from peft_kernels._ext import build_info
from peft_kernels import ops, nn, reference, select

__all__ = ["__version__", "build_info", "ops", "nn", "reference", "select"]
