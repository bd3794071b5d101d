"""Command line: ``python -m optlayers demo | bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optlayers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a tour of optlayers on real data, with checks")
    demo.add_argument("--quick", action="store_true", help="smaller sizes (about 30 s)")
    demo.add_argument("--out", default="optlayers-demo", help="report folder (default ./optlayers-demo/)")
    demo.add_argument("--stage", action="append", default=None, help="run only this stage (repeatable)")
    bench = sub.add_parser("bench", help="benchmarks against other libraries")
    bench.add_argument("suites", nargs="*", help="suites to run (default: all)")
    bench.add_argument("--full", action="store_true", help="the sizes the issues name")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--json", default="benchmark-results.json", help="where to write the JSON results")
    bench.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(quick=args.quick, out=args.out, stages=args.stage)
    from .bench import run_bench

    return run_bench(args.suites, full=args.full, device=args.device, json_path=args.json, list_only=args.list)


if __name__ == "__main__":
    sys.exit(main())
