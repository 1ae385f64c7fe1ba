"""`python -m bench <scenario> [options]` (also `nox -s bench -- <scenario>`).

Scenarios: latency, throughput, prefix, spec, stream; `--quick` runs a tiny
workload (a harness check); `--out-dir` puts records and plots elsewhere.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from types import ModuleType

from bench import latency, prefix, spec, stream, throughput
from bench.common import RunOptions, add_common_arguments
from bench.runner import run_plan
from bench.worker import WorkerPool

SCENARIOS: dict[str, ModuleType] = {
    "latency": latency,
    "throughput": throughput,
    "prefix": prefix,
    "spec": spec,
    "stream": stream,
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench")
    sub = top.add_subparsers(dest="scenario", required=True)
    for name, module in SCENARIOS.items():
        doc = module.__doc__ or name
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_common_arguments(p, module.DEFAULT_SYSTEMS, module.DEFAULT_DTYPES)
        module.add_arguments(p)
    return top


def main(argv: list[str] | None = None, pool: WorkerPool | None = None) -> int:
    """Run one scenario; ``pool`` lends already started workers (tests run many scenarios)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    module = SCENARIOS[args.scenario]
    opts = RunOptions.from_args(args, "python -m bench " + shlex.join(argv), module.DEFAULT_DTYPES)
    run_plan(opts, lambda info: module.plan(args, opts, info), pool)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
