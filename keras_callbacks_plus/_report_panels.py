"""The panels of the activation report: the overview heatmaps and one row per layer.

Kept apart from `report.py` (which lays out pages and files) so that each
stays small; matplotlib is imported by the caller, through `report.py`.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Sequence

import numpy as np

PHASE_COLORS = {"test": "tab:blue", "train": "tab:orange"}
# Labels longer than this are shortened in the middle; the page's legend
# gives them in full.
LABEL_CHARS = 48


def common_prefix(names: Sequence[str]) -> str:
    """The leading path segments (`"backbone/"`) of most of `names`, worth writing once, or ''.

    A backbone's layers all start with its name; the head's do not, so
    "most" is at least half of the names, and the prefix at least 8
    characters.
    """
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            key = "/".join(parts[:depth]) + "/"
            counts[key] = counts.get(key, 0) + 1
    best = ""
    for prefix, count in counts.items():
        if 2 * count >= len(names) > 1 and len(prefix) >= 8 and len(prefix) > len(best):
            best = prefix
    return best


def strip(name: str, prefix: str) -> str:
    """`name` with `prefix` written '…/'."""
    return "…/" + name[len(prefix):] if prefix and name.startswith(prefix) else name


def short_label(name: str, prefix: str) -> str:
    """`strip(name, prefix)`, its middle left out ('…') if longer than LABEL_CHARS."""
    name = strip(name, prefix)
    if len(name) <= LABEL_CHARS:
        return name
    keep = (LABEL_CHARS - 1) // 2
    return f"{name[:keep]}…{name[-keep:]}"


def wrapped(name: str, width: int = 34) -> str:
    """A full layer path on several lines, broken after '/' or '_' where possible."""
    return "\n".join(textwrap.wrap(name.replace("/", "/ ").replace("_", "_\u200b"), width,
                                   break_long_words=True)).replace("/ ", "/").replace("\u200b", "")


def outside_share(record: dict[str, Any]) -> np.ndarray:
    """Per epoch, the share of the (sampled) values outside that epoch's edges."""
    beyond = record["underflow"] + record["overflow"]
    return beyond / np.maximum(np.sum(record["histogram"], axis=1) + beyond, 1)


def epoch_bounds(epochs: np.ndarray) -> np.ndarray:
    """Cell boundaries around the logged epochs (halfway between neighbours)."""
    epochs = np.asarray(epochs, np.float64)
    if len(epochs) == 1:
        return np.array([epochs[0] - 0.5, epochs[0] + 0.5])
    steps = np.diff(epochs)
    return np.concatenate([[epochs[0] - steps[0] / 2], epochs[:-1] + steps / 2,
                           [epochs[-1] + steps[-1] / 2]])


# ------------------------------------------------------------------ overview

OVERVIEW = (
    ("mean", "mean", "RdBu_r"),
    ("std", "std (log scale)", "viridis"),
    ("zero_frac", "fraction of exact zeros", "magma"),
    ("outside", "share outside the histogram edges", "Reds"),
)


def overview_values(records: Sequence[dict | None], statistic: str, epochs: np.ndarray):
    """`(layers, epochs)` of one statistic, NaN where a layer has no row for an epoch."""
    table = np.full((len(records), len(epochs)), np.nan)
    column = {int(e): i for i, e in enumerate(epochs)}
    for row, record in enumerate(records):
        if record is None:
            continue
        values = outside_share(record) if statistic == "outside" else record[statistic]
        for epoch, value in zip(record["epoch"], values):
            table[row, column[int(epoch)]] = value
    return table


def draw_overview_panel(ax, table: np.ndarray, epochs: np.ndarray, statistic: str, cmap: str,
                        scale: np.ndarray):
    """One heatmap: layers down, epochs across, colors scaled to `scale` (all phases).

    Returns the mesh, for the colorbar.
    """
    from matplotlib import colors

    finite = scale[np.isfinite(scale)]
    if statistic == "mean":
        top = float(np.max(np.abs(finite))) if finite.size else 1.0
        # Means differ by orders of magnitude between layers: a symmetric log
        # scale shows small ones without saturating on large ones.
        small = float(np.percentile(np.abs(finite), 10)) if finite.size else 1e-3
        norm = colors.SymLogNorm(linthresh=max(small, top * 1e-4, 1e-12),
                                 vmin=-max(top, 1e-12), vmax=max(top, 1e-12))
    elif statistic == "std":
        positive = finite[finite > 0]
        low = float(positive.min()) if positive.size else 1e-3
        high = float(positive.max()) if positive.size else 1.0
        norm = colors.LogNorm(vmin=low, vmax=max(high, low * 1.01))
        table = np.where(table > 0, table, np.nan)
    elif statistic == "outside":
        norm = colors.Normalize(vmin=0.0, vmax=max(0.05, float(finite.max()) if finite.size else 0))
    else:
        norm = colors.Normalize(vmin=0.0, vmax=1.0)
    y = np.arange(table.shape[0] + 1) - 0.5
    mesh = ax.pcolormesh(epoch_bounds(epochs), y, np.ma.masked_invalid(table), cmap=cmap,
                         norm=norm, shading="flat")
    ax.set_ylim(table.shape[0] - 0.5, -0.5)
    ax.set_facecolor("0.85")  # missing cells
    return mesh


def log_ticks(low: float, high: float, most: int = 5) -> list[float]:
    """At most `most` ticks in [low, high] on a log scale: every k-th power of ten, or
    1, 2, 5 times them when the range spans under two decades."""
    first, last = math.ceil(math.log10(low)), math.floor(math.log10(high))
    if last - first >= 2:
        step = -(-(last - first + 1) // most)
        return [10.0**d for d in range(first, last + 1, step)]
    ticks = [m * 10.0**d for d in range(first - 1, last + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if low <= t <= high]
    if len(ticks) < 2:  # a narrow range: its ends too
        return sorted({low, *ticks, high})
    return ticks[::-(-len(ticks) // most)]


def tidy_colorbar(bar, statistic: str) -> None:
    """Few, non-overlapping tick labels on a narrow horizontal colorbar."""
    from matplotlib import ticker

    bar.ax.tick_params(labelsize=6)
    if statistic == "std":
        bar.ax.xaxis.set_major_locator(ticker.FixedLocator(log_ticks(bar.norm.vmin,
                                                                     bar.norm.vmax)))
        bar.ax.xaxis.set_minor_locator(ticker.NullLocator())
        bar.ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
    elif statistic == "mean":  # the ends and where the scale turns linear
        top, linear = bar.norm.vmax, bar.norm.linthresh
        bar.ax.xaxis.set_major_locator(ticker.FixedLocator([-top, -linear, 0.0, linear, top]))
        bar.ax.xaxis.set_minor_locator(ticker.NullLocator())
        bar.ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
    else:
        bar.ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=5))


# --------------------------------------------------------------- layer rows


def draw_layer_row(figure, grid, row: int, label: str, records: dict[str, Any], first: bool,
                   last: bool) -> None:
    """Statistics, zero fraction and one histogram heatmap per phase for one layer."""
    from matplotlib.ticker import MaxNLocator

    stats_ax = figure.add_subplot(grid[row, 0])
    zeros_ax = figure.add_subplot(grid[row, 1], sharex=stats_ax)
    for phase, record in records.items():
        if record is None:
            continue
        epochs, color = record["epoch"], PHASE_COLORS.get(phase, "tab:gray")
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
    stats_ax.set_ylabel(label, fontsize=7.5, rotation=0, ha="right", va="center", labelpad=8)
    stats_ax.set_title("mean ± std (min, max dotted)" if first else "", fontsize=9)
    zeros_ax.set_title("fraction of exact zeros" if first else "", fontsize=9)
    zeros_ax.set_ylim(-0.03, 1.03)
    for ax in (stats_ax, zeros_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if last:
            ax.set_xlabel("epoch", fontsize=8)
    if first:
        stats_ax.legend(fontsize=7, loc="best")
    if any(r is not None and np.any(r["nonfinite_frac"] > 0) for r in records.values()):
        zeros_ax.legend(fontsize=7, loc="best")
    for column, (phase, record) in enumerate(records.items(), start=2):
        ax = figure.add_subplot(grid[row, column])
        ax.tick_params(labelsize=7)
        if record is None:
            ax.set_axis_off()
            continue
        brightest = draw_histograms(ax, record)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        title = f"{phase} histograms: brightest ≥ {100 * brightest:.0f}%"
        outside = outside_share(record).max()
        if outside >= 0.0005:
            title += f", outside edges ≤ {100 * outside:.1f}%"
        ax.set_title(title, fontsize=7.5)
        if last:
            ax.set_xlabel("epoch", fontsize=8)


def draw_histograms(ax, record: dict[str, Any]) -> float:
    """Each epoch's histogram as a column over that epoch's own edges, in one mesh.

    Columns are rectangles `[edge_j, edge_j+1)` of their epoch; a zero-width
    column between two epochs lets the edges change from one to the next.
    Returns the share at which the color saturates.
    """
    from matplotlib.colors import PowerNorm

    histogram = np.asarray(record["histogram"], np.float64)
    edges = np.asarray(record["bin_edges"], np.float64)
    if edges.ndim == 1:  # a single epoch's edges
        edges = np.tile(edges, (len(histogram), 1))
    share = histogram / np.maximum(histogram.sum(axis=1, keepdims=True), 1.0)
    bounds = epoch_bounds(record["epoch"])
    epochs = len(share)
    x = np.repeat(bounds, 2)[1:-1]  # left, right of each epoch: 2E corners
    y = np.repeat(edges.T, 2, axis=1)  # (bins + 1, 2E): each epoch's edges at both corners
    cells = np.full((share.shape[1], 2 * epochs - 1), np.nan)
    cells[:, ::2] = share.T
    # A square-root color scale spreads small shares, which matter most. It
    # tops at the largest share but one per epoch, so that one dominant bin
    # (a ReLU's zeros, shown in the zeros panel) saturates instead of
    # darkening the rest.
    top = np.sort(share, axis=1)[:, -2] if share.shape[1] > 1 else share[:, -1]
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(top.max()), 1e-9), clip=True)
    ax.pcolormesh(np.broadcast_to(x, y.shape), y, np.ma.masked_invalid(cells),
                  cmap="viridis", norm=norm, shading="flat", rasterized=True)
    ax.set_ylim(float(edges[:, 0].min()), float(edges[:, -1].max()))
    ax.set_xlim(bounds[0], bounds[-1])
    ax.set_facecolor("0.85")  # outside an epoch's edges: gray, not an empty bin's color
    return float(norm.vmax)
