"""The CPU kernels' other SIMD paths: the op test files run again in a child process with
PEFT_KERNELS_CPU_ISA capping the kernels to AVX2 and to the generic (compiler-vectorised) code,
which the default run on an AVX-512 or AVX2 machine never reaches."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peft_kernels

TESTS = Path(__file__).resolve().parent
OP_TESTS = ["test_lora_linear.py", "test_expm.py", "test_truncated_svd.py",
            "test_sparse_delta_linear.py", "test_lie.py", "test_orthogonal.py",
            "test_block_rotate.py"]


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_op_tests_pass_on_the_capped_path(isa):
    # The child must import the package this process tests, wherever the tests run from.
    package_root = str(Path(peft_kernels.__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PEFT_KERNELS_CPU_ISA=isa, PYTHONPATH=pythonpath)
    check = subprocess.run([sys.executable, "-c", "import peft_kernels as pk; "
                            "print(pk.build_info()['cpu_isa'])"],
                           env=env, capture_output=True, text=True, check=True)
    running = check.stdout.strip()
    assert running == isa or (isa == "avx2" and running == "generic")  # no AVX2 on this CPU
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             *OP_TESTS], cwd=TESTS, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


@pytest.mark.parametrize("value,expect_generic,reported", [
    ("GENERIC", True, False), ("bogus", False, True), ("", False, False)])
def test_isa_variable_is_read_in_any_case_and_a_bad_value_is_reported(value, expect_generic,
                                                                      reported):
    env = dict(os.environ, PEFT_KERNELS_CPU_ISA=value)
    result = subprocess.run([sys.executable, "-c", "import peft_kernels as pk; "
                             "print(pk.build_info()['cpu_isa'])"],
                            env=env, capture_output=True, text=True, check=True)
    assert (result.stdout.strip() == "generic") == expect_generic
    assert ("is not one of generic, avx2, avx512" in result.stderr) == reported
