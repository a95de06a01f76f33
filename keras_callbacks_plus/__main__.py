"""Command line: `python -m keras_callbacks_plus <command> ...`.

Commands:
    report  Draw an ActivationLogger HDF5 log as a PNG (needs matplotlib).

Each command is a `_add_<name>(subparsers)` that registers its parser and
sets `run`, a function of the parsed arguments returning the exit status.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _report(args: argparse.Namespace) -> int:
    from keras_callbacks_plus.report import plot_activation_log

    output = plot_activation_log(
        args.log, args.output, run=args.run, layers=args.layers, phases=args.phases, dpi=args.dpi
    )
    print(f"Wrote {output}")
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="draw an ActivationLogger HDF5 log as a PNG",
        description="Draws an ActivationLogger HDF5 log: per layer, mean ± std and the "
        "fraction of zeros over epochs, and the histograms over epochs as a heatmap.",
    )
    parser.add_argument("log", help="the .h5 file written by ActivationLogger(h5_path=...)")
    parser.add_argument("-o", "--output", default="report.png",
                        help="PNG to write (default: %(default)s)")
    parser.add_argument("--run", type=int, default=-1,
                        help="which run of the file, as a list index (default: the last)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                        help="glob patterns of layer paths to draw (default: all)")
    parser.add_argument("--phases", nargs="+", default=None, choices=("test", "train"),
                        help="phases to draw (default: all logged)")
    parser.add_argument("--dpi", type=int, default=80, help="resolution (default: %(default)s)")
    parser.set_defaults(run_command=_report)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_callbacks_plus",
        description="Tools of keras_callbacks_plus.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    _add_report(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run_command(args)
    except (ValueError, ImportError, OSError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
