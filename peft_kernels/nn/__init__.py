"""Drop-in PEFT layers built on the fused kernels."""
from peft_kernels.nn.lora import LoRALinear

__all__ = ["LoRALinear"]
