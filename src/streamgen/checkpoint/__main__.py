"""Command line for the model cache: ``python -m streamgen.checkpoint fetch``.

``fetch`` builds the default model if needed (download, conversion), verifies
it, and prints its directory on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from streamgen.checkpoint.default_model import DEFAULT_MODEL_NAME, default_model_path
from streamgen.errors import ModelLoadError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code.

    Example:
        >>> main(["fetch", "--quiet"])  # doctest: +SKIP
        /root/.cache/streamgen/checkpoint/SmolLM2-135M-Instruct
        0
    """
    parser = argparse.ArgumentParser(
        prog="python -m streamgen.checkpoint", description="Manage streamgen's local model cache."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "fetch", help=f"build or verify {DEFAULT_MODEL_NAME} and print its directory"
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="streamgen: %(levelname)s: %(message)s")
    try:
        model_dir = default_model_path(progress=not args.quiet)
    except ModelLoadError as err:
        print(f"streamgen: error: {err}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
