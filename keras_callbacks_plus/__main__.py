"""Command line: `python -m keras_callbacks_plus <command> ...`.

Commands:
    demo    Pre-train a small CNN, fine-tune it data-parallel with all four callbacks.
    report  Draw an ActivationLogger HDF5 log: overview and detail pages (needs matplotlib).

Each command is a `_add_<name>(subparsers)` that registers its parser and
sets `run`, a function of the parsed arguments returning the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _demo(args: argparse.Namespace) -> int:
    from keras_callbacks_plus import distribute
    from keras_callbacks_plus.demo import format_summary, run_demo

    if not args.single_device:
        # Before the backend starts: two CPU devices unless accelerators are found.
        distribute.emulate_cpu_devices(2)
    summary = run_demo(
        args.out,
        samples=args.samples,
        pretrain_epochs=args.pretrain_epochs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_time=args.max_time,
        seed=args.seed,
        verbose=0 if args.quiet else 1,
    )
    print(format_summary(summary))
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="pre-train a small CNN, fine-tune it data-parallel with all four callbacks",
        description="Writes images of shapes to HDF5, pre-trains a small CNN on one task, "
        "fine-tunes it on another on a data_parallel twin (every GPU, else two emulated CPU "
        "devices) with ProgressiveUnfreezing, ActivationLogger, RobustEarlyStopping and "
        "ParallelModelCheckpoint, then loads the best checkpoint on one device and scores it. "
        "Offline; a few minutes on 2 CPU cores.",
    )
    parser.add_argument("--out", default="runs/demo",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=4096,
                        help="images per task (default: %(default)s)")
    parser.add_argument("--pretrain-epochs", type=int, default=3,
                        help="epochs on the first task (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=12,
                        help="most fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="global batch size (default: %(default)s)")
    parser.add_argument("--max-time", type=float, default=120.0,
                        help="fine-tuning time budget in seconds (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--single-device", action="store_true",
                        help="do not split the CPU into two devices")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the summary")
    parser.set_defaults(run_command=_demo)


def _storage_options(pairs: Sequence[str] | None) -> dict:
    """`KEY=VALUE` pairs as fsspec options: dotted keys nest, JSON values are decoded.

    `client_kwargs.endpoint_url=http://127.0.0.1:9000` gives
    `{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}`.
    """
    options: dict = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid --storage-option {pair!r}: expected KEY=VALUE.")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, last = key.split(".")
        target = options
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return options


def _report(args: argparse.Namespace) -> int:
    from keras_callbacks_plus.report import write_activation_report

    written = write_activation_report(
        args.log, args.output, run=args.run, layers=args.layers, phases=args.phases,
        dpi=args.dpi, layers_per_page=args.layers_per_page,
        storage_options=_storage_options(args.storage_option) or None,
    )
    for path in written:
        print(f"Wrote {path}")
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="draw an ActivationLogger HDF5 log: overview and detail pages",
        description="Draws an ActivationLogger HDF5 log: an overview (per layer and epoch: "
        "mean, std, zero fraction, share outside the histogram edges), then detail pages "
        "(per layer: mean ± std and the zero fraction over epochs, the histograms over "
        "epochs as a heatmap). A PNG output is the overview, with the pages beside it "
        "(<name>-p01.png, ...) when there are more layers than --layers-per-page; a PDF "
        "holds every page.",
    )
    parser.add_argument("log", help="the .h5 file written by ActivationLogger(h5_path=...), "
                        "or its URL (s3://bucket/run/activations.h5)")
    parser.add_argument("-o", "--output", default="report.png",
                        help="PNG or PDF to write (default: %(default)s)")
    parser.add_argument("--run", type=int, default=-1,
                        help="which run of the file, as a list index (default: the last)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                        help="layers to draw: names or globs matched at any depth ('conv*'), "
                        "paths from the top ('backbone/block_3*') or 'all' (default: all)")
    parser.add_argument("--phases", nargs="+", default=None, choices=("test", "train"),
                        help="phases to draw (default: all logged)")
    parser.add_argument("--layers-per-page", type=int, default=30,
                        help="most layers on a detail page (default: %(default)s)")
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="an fsspec option for a log URL, repeatable; dotted keys nest, "
                        "JSON values are decoded "
                        "(client_kwargs.endpoint_url=http://127.0.0.1:9000)")
    parser.add_argument("--dpi", type=int, default=80, help="resolution (default: %(default)s)")
    parser.set_defaults(run_command=_report)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_callbacks_plus",
        description="Tools of keras_callbacks_plus.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    _add_demo(subparsers)
    _add_report(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run_command(args)
    except (ValueError, ImportError, OSError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
