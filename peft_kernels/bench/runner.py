"""`python -m peft_kernels bench`: run registered cases, print a table, optionally JSON and a plot."""
from __future__ import annotations

import datetime
import json
import platform
import sys

import torch

from peft_kernels._ext import build_info
from peft_kernels.bench.registry import all_cases, peak_memory_mb, time_interleaved


def add_arguments(parser) -> None:
    parser.add_argument("--op", action="append", help="only cases of this op (repeatable)")
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append",
                        help="only this device (default: cpu, and cuda when available)")
    parser.add_argument("--filter", default="", help="only cases whose name contains this text")
    parser.add_argument("--all", action="store_true", help="include the long cases too")
    # 3 keeps the default run of every case under two minutes on a 2-core CPU; the figures in
    # benchmarks/RESULTS.md use --reps 10 or 20.
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per function")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH.png", help="also plot the speedups (matplotlib)")


def _devices(args) -> list[str]:
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = args.device or available
    missing = [d for d in wanted if d not in available]
    if missing:
        raise SystemExit(f"bench: device {missing[0]} is not available here")
    return wanted


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    processor = platform.processor() or platform.machine()
    return f"{processor} ({build_info()['cpu_isa']} kernels), {torch.get_num_threads()} threads"


def run_case(case, reps: int) -> dict:
    row = {"case": case.name, "op": case.op, "device": case.device, "baseline": case.baseline_name,
           "floor": case.floor_name or None}
    measured = case.setup()
    err = measured.error()
    row["max_rel_error"] = err
    row["tolerance"] = measured.tolerance
    if measured.baseline_error is not None:
        row["baseline_rel_error"] = measured.baseline_error()
    if not err <= measured.tolerance:  # also catches NaN
        row["status"] = "WRONG"
        return row
    fns = {"baseline": measured.baseline, "kernel": measured.kernel}
    if measured.floor is not None:
        fns["floor"] = measured.floor
    if case.max_reps is not None:
        reps = min(reps, case.max_reps)
    times = time_interleaved(fns, case.device, warmup=case.warmup, reps=reps)
    row.update({f"{k}_ms": v for k, v in times.items()})
    row["speedup"] = times["baseline"] / times["kernel"]
    if "floor" in times:
        row["kernel_over_floor"] = times["kernel"] / times["floor"]
        row["baseline_over_floor"] = times["baseline"] / times["floor"]
    if case.measure_memory:
        for name, fn in fns.items():
            row[f"{name}_peak_mb"] = peak_memory_mb(fn, case.device)
    row["status"] = "ok"
    return row


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = ["case", "dev", "baseline ms", "kernel ms", "speedup", "kernel/floor", "base/floor",
            "max rel err"]
    table = [[r["case"], r["device"], _fmt(r.get("baseline_ms"), ".2f"), _fmt(r.get("kernel_ms"), ".2f"),
              _fmt(r.get("speedup"), ".2f") + ("x" if "speedup" in r else ""),
              _fmt(r.get("kernel_over_floor"), ".3f"), _fmt(r.get("baseline_over_floor"), ".3f"),
              f"{r['max_rel_error']:.1e}" + ("" if r["status"] == "ok" else " WRONG")] for r in rows]
    if any(r.get("baseline_rel_error") is not None for r in rows):
        head.append("base rel err")
        for cells, r in zip(table, rows):
            cells.append(_fmt(r.get("baseline_rel_error"), ".1e"))
    if any(r.get("kernel_peak_mb") is not None for r in rows):
        head.append("peak MiB base/kernel/floor")
        for cells, r in zip(table, rows):
            cells.append("/".join(_fmt(r.get(f"{k}_peak_mb"), ".0f")
                                  for k in ("baseline", "kernel", "floor")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(head), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for cells in table:
        print(line(cells), file=out)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit("bench --plot needs matplotlib: pip install matplotlib "
                         "(or the package's [plot] extra)") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(ok) + 1.2))
    labels = [f"{r['case']} [{r['device']}]" for r in ok]
    ax.barh(labels, [r["speedup"] for r in ok], color="#3b7dd8")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("speedup over the pure-PyTorch baseline (higher is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args) -> int:
    from peft_kernels import build_info

    devices = _devices(args)
    cases = [c for c in all_cases() if c.device in devices and (args.all or c.quick)
             and (not args.op or c.op in args.op) and args.filter in c.name]
    if not cases:
        print("bench: no case matches")
        return 1
    info = build_info()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "peft_kernels": info["version"], "cuda_kernels": info["cuda"],
            "devices": {d: _device_name(d) for d in devices}}
    print(f"peft_kernels {info['version']} | torch {torch.__version__} | "
          + " | ".join(f"{d}: {n}" for d, n in meta["devices"].items()))
    if "cuda" in devices and not info["cuda"]:
        print("bench: this build has no CUDA kernels; CUDA cases are skipped")
        cases = [c for c in cases if c.device != "cuda"]
    rows = []
    for case in cases:
        rows.append(run_case(case, args.reps))
        r = rows[-1]
        print(f"  {case.name} [{case.device}]: " + (
            f"{r['speedup']:.2f}x vs baseline" if r["status"] == "ok" else
            f"WRONG (error {r['max_rel_error']:.2e} > {r['tolerance']:.0e})"), flush=True)
    print()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0 if all(r["status"] == "ok" for r in rows) else 2
