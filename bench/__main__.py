"""`python -m bench <scenario> [options]` (also `nox -s bench -- <scenario>`)."""

from __future__ import annotations

import argparse

from bench import latency, throughput

SCENARIOS = {"latency": latency, "throughput": throughput}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, module in SCENARIOS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args()
    SCENARIOS[args.scenario].run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
