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
