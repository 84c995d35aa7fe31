"""python -m benchmarks [run] [--profile quick|full] | tune [--write tuned.toml]"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="batchd benchmark")
    sub = parser.add_subparsers(dest="command")
    for name in ("run", "tune"):
        p = sub.add_parser(name)
        p.add_argument("--config", default="config.toml", help="batchd config under test (relative to the repo)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config key for every batchd server of the run")
        p.add_argument("--layout", choices=("shared", "split"), default="shared",
                       help="shared: servers on all CPUs, client pinned to the last one; split: client alone on "
                            "the last CPU, servers and ceiling on the others")
        if name == "run":
            p.add_argument("--profile", choices=("quick", "full"), default="quick")
        else:
            p.add_argument("--quick", action="store_true", help="fewer configs, shorter points")
            p.add_argument("--write", default=None, metavar="PATH", help="write the best config as a config.toml")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:] or ["run"])
    t = time.monotonic()
    if args.command in (None, "run"):
        from .bench import run_bench

        run_bench(getattr(args, "profile", "quick"), args.config, args.overrides, args.layout)
    else:
        from .tune import tune

        tune(args.config, args.overrides, args.layout, args.quick, args.write)
    print(f"benchmark finished in {time.monotonic() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
