"""pytest-benchmark over the registry that `python -m peft_kernels bench` runs.

Each registered case gives three benchmarks in one group: the pure-PyTorch baseline, the kernel,
and (where there is one) the physical floor. The kernel's correctness gate runs before timing.

    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=median,iqr
"""
import pytest

from peft_kernels.bench import all_cases
from peft_kernels.bench.registry import synchronize

CASES = all_cases()


def _params():
    for case in CASES:
        marks = [pytest.mark.cuda] if case.device == "cuda" else []
        for role in ("baseline", "kernel", "floor"):
            yield pytest.param(case, role, id=f"{case.device}-{case.name}-{role}", marks=marks)


_measured = {}


@pytest.mark.parametrize("case, role", list(_params()))
def test_case(benchmark, case, role):
    key = (case.name, case.device)
    if key not in _measured:
        measured = case.setup()
        error = measured.error()
        assert error <= measured.tolerance, f"{case.name}: error {error:.2e} > {measured.tolerance:.0e}"
        _measured.clear()  # keep one case's inputs alive at a time
        _measured[key] = measured
    measured = _measured[key]
    fn = getattr(measured, role)
    if fn is None:
        pytest.skip(f"{case.name} has no {role}")
    benchmark.group = f"{case.device} {case.name}"
    benchmark.extra_info.update(op=case.op, role=role)

    def run():
        fn()
        synchronize(case.device)

    rounds = 8 if case.max_reps is None else min(8, case.max_reps)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=min(1, case.warmup), iterations=1)
