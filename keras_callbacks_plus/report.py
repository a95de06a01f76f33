"""PNG reports of the logs written by this package's callbacks (needs matplotlib, the `plot` extra).

`plot_activation_log` draws an `ActivationLogger` HDF5 log: one row per
layer, with its mean ± std and its zero fraction over the logged epochs, and
its histograms over the epochs as a heatmap, per phase. The command line
`python -m keras_callbacks_plus report activations.h5 -o report.png` calls it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from keras_callbacks_plus import _layers

__all__ = ["plot_activation_log"]

_PHASE_COLORS = {"test": "tab:blue", "train": "tab:orange"}


def _pyplot_free_figure(width: float, height: float, dpi: int):
    """A matplotlib Figure drawn by the Agg canvas, without pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Reports need matplotlib: pip install 'keras_callbacks_plus[plot]' "
            "(or pip install matplotlib)."
        ) from error
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _chosen(names: Sequence[str], patterns: Sequence[str] | None, owner: str) -> list[str]:
    """The logged names that `patterns` select (the rules of `_layers.match`), in log order.

    A layer with several outputs is logged as `"<path>:<index>"`: a pattern
    selects all of them by the layer's path, or one by its own name.
    """
    if not patterns:
        return list(names)
    layer = {name: re.sub(r":\d+$", "", name) for name in names}
    candidates = list(dict.fromkeys(p for name in names for p in (layer[name], name)))
    chosen = set(_layers.match(candidates, patterns, owner=owner))
    return [name for name in names if name in chosen or layer[name] in chosen]


def plot_activation_log(
    log: str | os.PathLike | list[dict[str, Any]],
    output: str | os.PathLike,
    *,
    run: int = -1,
    layers: Sequence[str] | None = None,
    phases: Sequence[str] | None = None,
    dpi: int = 80,
) -> Path:
    """Draws an activation log as a PNG: per layer, statistics and histograms over epochs.

    Each row is one layer (model order). Left: mean ± std over the logged
    epochs, min and max dotted, one color per phase. Middle: the fraction of
    exact zeros (dead units) and, if any, of non-finite values. Right, one
    panel per phase: the histograms as a heatmap, epochs across, the fixed
    bin edges up, color the share of values in each bin of that epoch
    (values outside the edges are noted in the panel's title).

    Args:
        log: the `.h5` path written by `ActivationLogger`, or what
            `read_activation_log` returned.
        output: the PNG to write.
        run: which run of the file, as a list index. Defaults to -1, the last.
        layers: the layers to draw: names or glob patterns, matched at any
            depth (`"conv*"`), paths from the top (`"backbone/block_3*"`) or
            `"all"`, as in the callbacks. Defaults to `None`, all.
        phases: phases to draw. Defaults to `None`, all in the run.
        dpi: resolution. Defaults to 80.

    Returns:
        The path of the PNG.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the run, a layer pattern or a phase is not in the log.
    """
    if not isinstance(log, list):
        from keras_callbacks_plus.activations import read_activation_log

        log = read_activation_log(log)
    if not log:
        raise ValueError("The activation log holds no run.")
    try:
        chosen_run = log[run]
    except IndexError:
        raise ValueError(f"Invalid value for argument run. The log has {len(log)} run(s). "
                         f"Received: run={run}") from None
    by_phase = chosen_run["layers"]
    all_phases = [p for p in chosen_run["attrs"].get("phases", list(by_phase)) if p in by_phase]
    phases = list(phases or all_phases)
    missing = [p for p in phases if p not in by_phase]
    if missing or not phases:
        raise ValueError(f"Phases {missing or phases} are not in run {chosen_run['name']}. "
                         f"Logged phases: {all_phases}.")
    names = list(chosen_run["attrs"].get("layers", []))
    for phase in phases:
        names += [n for n in by_phase[phase] if n not in names]
    owner = f"the log of model {chosen_run['attrs'].get('model', '?')!r}"
    names = [n for n in _chosen(names, layers, owner) if any(n in by_phase[p] for p in phases)]

    columns = 2 + len(phases)
    row_height = 1.9
    figure = _pyplot_free_figure(4.2 * 2 + 4.6 * len(phases), 0.9 + row_height * len(names), dpi)
    grid = figure.add_gridspec(
        len(names), columns, width_ratios=[4.2, 4.2] + [4.6] * len(phases),
        left=0.1, right=0.97, top=1 - 0.75 / figure.get_figheight(),
        bottom=0.45 / figure.get_figheight(), hspace=0.55, wspace=0.28,
    )
    attrs = chosen_run["attrs"]
    figure.suptitle(
        f"Activations of model {attrs.get('model', '?')} ({chosen_run['name']}, "
        f"{attrs.get('backend', '?')} backend, started {attrs.get('started', '?')}): "
        f"{len(names)} layers, phases {', '.join(phases)}",
        fontsize=12, y=1 - 0.25 / figure.get_figheight(),
    )
    for row, name in enumerate(names):
        _draw_layer(figure, grid, row, name, {p: by_phase[p].get(name) for p in phases},
                    last=row == len(names) - 1)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=dpi)
    return output


def _draw_layer(figure, grid, row: int, name: str, records: dict[str, Any], last: bool) -> None:
    stats_ax = figure.add_subplot(grid[row, 0])
    zeros_ax = figure.add_subplot(grid[row, 1], sharex=stats_ax)
    for phase, record in records.items():
        if record is None:
            continue
        epochs, color = record["epoch"], _PHASE_COLORS.get(phase, "tab:gray")
        mean, std = record["mean"], record["std"]
        marker = "o" if len(epochs) < 25 else None
        stats_ax.plot(epochs, mean, color=color, marker=marker, markersize=3, label=phase)
        stats_ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        stats_ax.plot(epochs, record["min"], color=color, linestyle=":", linewidth=0.8)
        stats_ax.plot(epochs, record["max"], color=color, linestyle=":", linewidth=0.8)
        zeros_ax.plot(epochs, record["zero_frac"], color=color, marker=marker, markersize=3,
                      label=f"{phase} zeros")
        if np.any(record["nonfinite_frac"] > 0):
            zeros_ax.plot(epochs, record["nonfinite_frac"], color="tab:red", marker="x",
                          markersize=4, label=f"{phase} non-finite")
    shape = next((r["output_shape"] for r in records.values() if r is not None), ())
    stats_ax.set_ylabel(f"{name}\n{tuple(shape)}", fontsize=9, rotation=0, ha="right",
                        va="center", labelpad=8)
    stats_ax.set_title("mean ± std (min, max dotted)" if row == 0 else "", fontsize=9)
    zeros_ax.set_title("fraction of exact zeros" if row == 0 else "", fontsize=9)
    zeros_ax.set_ylim(-0.03, 1.03)
    from matplotlib.ticker import MaxNLocator

    for ax in (stats_ax, zeros_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if last:
            ax.set_xlabel("epoch", fontsize=8)
    if row == 0:
        stats_ax.legend(fontsize=7, loc="best")
    if any(r is not None and np.any(r["nonfinite_frac"] > 0) for r in records.values()):
        zeros_ax.legend(fontsize=7, loc="best")
    for column, (phase, record) in enumerate(records.items(), start=2):
        ax = figure.add_subplot(grid[row, column])
        ax.tick_params(labelsize=7)
        if record is None:
            ax.set_axis_off()
            continue
        _draw_heatmap(ax, record)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        title = f"{phase}: histogram share per epoch" if row == 0 else phase
        beyond = record["underflow"] + record["overflow"]  # counts of the (sampled) values
        outside = beyond / np.maximum(np.sum(record["histogram"], axis=1) + beyond, 1)
        if np.any(outside > 0):
            title += f"  (outside edges: up to {100 * outside.max():.1f}%)"
        ax.set_title(title, fontsize=8)
        if last:
            ax.set_xlabel("epoch", fontsize=8)


def _draw_heatmap(ax, record: dict[str, Any]) -> None:
    epochs = np.asarray(record["epoch"], np.float64)
    histogram = np.asarray(record["histogram"], np.float64)
    share = histogram / np.maximum(histogram.sum(axis=1, keepdims=True), 1.0)
    if len(epochs) > 1:
        steps = np.diff(epochs)
        x = np.concatenate([[epochs[0] - steps[0] / 2], epochs[:-1] + steps / 2,
                            [epochs[-1] + steps[-1] / 2]])
    else:
        x = np.array([epochs[0] - 0.5, epochs[0] + 0.5])
    from matplotlib.colors import PowerNorm
    from matplotlib.ticker import PercentFormatter

    # A square-root color scale spreads small shares, which matter most. It
    # tops at the largest share but one per epoch, so that one dominant bin
    # (a ReLU's zeros, shown in the zeros panel) saturates instead of
    # darkening the rest.
    top = np.sort(share, axis=1)[:, -2] if share.shape[1] > 1 else share[:, -1]
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(top.max()), 1e-9), clip=True)
    mesh = ax.pcolormesh(x, record["bin_edges"], share.T, cmap="viridis", norm=norm,
                         shading="flat")
    vmax = norm.vmax
    bar = ax.figure.colorbar(mesh, ax=ax, pad=0.01, fraction=0.05, extend="max",
                             ticks=vmax * np.array([0.0, 1 / 16, 1 / 4, 9 / 16, 1.0]),
                             format=PercentFormatter(xmax=1.0, decimals=1 if vmax < 0.2 else 0))
    bar.ax.tick_params(labelsize=6)
