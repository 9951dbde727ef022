"""The benchmark machinery: correctness gate, timing fields, table; not speed."""
import io

import torch

from peft_kernels.bench import Case, Measured, all_cases
from peft_kernels.bench.lora_linear import _setup
from peft_kernels.bench.runner import print_table, run_case


def test_registry_has_lora_cases_on_both_devices():
    cases = [c for c in all_cases() if c.op == "lora_linear"]
    assert {c.device for c in cases} == {"cpu", "cuda"}
    assert len({(c.name, c.device) for c in cases}) == len(cases)


def test_small_lora_case_passes_gate_and_reports_ratios():
    case = Case(name="tiny", op="lora_linear", device="cpu",
                setup=_setup(64, 40, 24, 4, torch.float32, "cpu", 0.1, True))
    row = run_case(case, reps=2)
    assert row["status"] == "ok" and row["max_rel_error"] <= 1e-4
    for key in ("baseline_ms", "kernel_ms", "floor_ms", "speedup", "kernel_over_floor"):
        assert row[key] > 0
    out = io.StringIO()
    print_table([row], out=out)
    assert "tiny" in out.getvalue()


def test_wrong_kernel_is_flagged_and_not_timed():
    x = torch.randn(8, 8)
    case = Case(name="broken", op="demo", device="cpu", setup=lambda: Measured(
        kernel=lambda: x * 2, baseline=lambda: x, error=lambda: float("nan"), tolerance=1e-6))
    row = run_case(case, reps=2)
    assert row["status"] == "WRONG" and "kernel_ms" not in row
