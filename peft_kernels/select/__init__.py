"""Selection algorithms: which parameters of a pretrained model to tune, and how."""
from peft_kernels.select.spt import SPTEntry, SPTPlan, apply_plan, sensitivity, spt_plan

__all__ = ["sensitivity", "spt_plan", "apply_plan", "SPTPlan", "SPTEntry"]
