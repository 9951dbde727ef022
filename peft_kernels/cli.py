"""Command line: `python -m peft_kernels info` prints the build; `bench` (the default) runs the
registered benchmark cases on the devices at hand and reports speedups against the baselines;
`demo` fine-tunes a small model on a synthetic task with every PEFT method of the package."""
from __future__ import annotations

import argparse
import json


def _info(_args) -> int:
    import torch

    from peft_kernels._ext import ExtensionNotBuiltError, build_info

    try:
        info = build_info()
    except ExtensionNotBuiltError as err:
        print(err)
        return 1
    info["torch.cuda.is_available"] = torch.cuda.is_available()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print how the extension was built")
    bench = sub.add_parser("bench", help="run the benchmark registry (default)")
    from peft_kernels.bench.runner import add_arguments, run

    add_arguments(bench)
    from peft_kernels import demo

    demo.add_arguments(sub.add_parser("demo", help="fine-tune a small model with every method"))
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "demo":
        return demo.main(args)
    if args.command is None:
        args = parser.parse_args(["bench", *(argv or [])])
    return run(args)
