"""The example scripts run end to end (a few steps each, so they cannot rot unnoticed)."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,args,expect", [
    ("lora_finetune.py", ["--steps", "20"], "LoRA after merge_and_unload()"),
    ("ggm_allocation.py", ["--steps", "10", "--warmup", "5"], "GGM"),
])
def test_example_runs(script, args, expect):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=EXAMPLES,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout


def test_demo_command():
    result = subprocess.run([sys.executable, "-m", "peft_kernels", "demo", "--steps", "10"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SVD nodes r=8" in result.stdout


def test_demo_rows():
    from peft_kernels import demo

    rows = {row["method"]: row for row in demo.run(steps=10, hidden=64, out=lambda line: None)}
    assert len(rows) == 9
    # SPT is given LoRA's trainable budget and meets it exactly here (its blocks fit).
    assert rows["SPT (LoRA's budget)"]["trainable"] == rows["LoRA r=4"]["trainable"]
    assert rows["full fine-tuning"]["trainable"] == sum(
        p.numel() for p in demo.mlp(64, 64).parameters())
    for name, row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0
        if row["merge_max_abs_diff"] is not None:
            # merge_and_unload computes the same function in float32: a few roundings of
            # outputs of order 10 (LieRA's exp adds one more).
            assert row["merge_max_abs_diff"] <= 1e-4, name
    assert rows["parallel adapter r=4 relu"]["merge_max_abs_diff"] is None
