"""Selection algorithms: which parameters of a pretrained model to tune, and how."""
from peft_kernels.select.ggm import (GGMAllocation, GGMSolution, NodeScorer, apply_allocation,
                                     generalized_soft_threshold, ggm_allocate, ggm_bcd,
                                     ggm_finetune_plan, ggm_statistics, gst_threshold)
from peft_kernels.select.spt import SPTEntry, SPTPlan, apply_plan, sensitivity, spt_plan

__all__ = ["sensitivity", "spt_plan", "apply_plan", "SPTPlan", "SPTEntry",
           "NodeScorer", "ggm_statistics", "ggm_bcd", "ggm_allocate", "apply_allocation",
           "ggm_finetune_plan", "generalized_soft_threshold", "gst_threshold", "GGMAllocation",
           "GGMSolution"]
