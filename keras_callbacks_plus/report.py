"""Reports of the logs written by this package's callbacks (needs matplotlib, the `plot` extra).

`write_activation_report` draws an `ActivationLogger` HDF5 log:

* an overview: for every logged layer (down, in model order) and logged
  epoch (across), heatmaps of the mean, standard deviation, fraction of
  exact zeros and share of values outside the histogram edges, per phase;
  one page whatever the number of layers (readable at 200);
* detail pages of at most `layers_per_page` layers: per layer its mean ± std
  with min and max, its zero fraction, and its histograms over the epochs
  as a heatmap per phase, each epoch drawn over its own bin edges.

With few layers both go on one page (one PNG). Otherwise a PNG output is the
overview and the pages are written beside it as `<name>-p01.png`, ...; a PDF
output holds them all. Layer labels are the full paths (wrapped on the detail
pages); the overview shortens only the middle of very long ones, listed in
full at its foot. The command line
`python -m keras_callbacks_plus report activations.h5 -o report.png` calls it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from keras_callbacks_plus import _layers
from keras_callbacks_plus import _report_panels as panels
from keras_callbacks_plus._validate import check_int

__all__ = ["plot_activation_log", "write_activation_report"]


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


def _select(log, run: int, layers, phases, storage_options):
    """`(run record, phases, layer names)` of the log, as the arguments choose them."""
    if not isinstance(log, list):
        from keras_callbacks_plus._activation_log import read_activation_log

        log = read_activation_log(log, storage_options=storage_options)
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
    return chosen_run, phases, names


def _title(chosen_run: dict[str, Any], names: Sequence[str], phases: Sequence[str]) -> str:
    attrs = chosen_run["attrs"]
    return (f"Activations of model {attrs.get('model', '?')} ({chosen_run['name']}, "
            f"{attrs.get('backend', '?')} backend, started {attrs.get('started', '?')}): "
            f"{len(names)} layers, phases {', '.join(phases)}")


def write_activation_report(
    log: str | os.PathLike | list[dict[str, Any]],
    output: str | os.PathLike,
    *,
    run: int = -1,
    layers: Sequence[str] | None = None,
    phases: Sequence[str] | None = None,
    dpi: int = 80,
    layers_per_page: int = 30,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Draws an activation log: an overview of every layer, then detail pages; returns the files.

    Args:
        log: the `.h5` path (or URL) written by `ActivationLogger`, or what
            `read_activation_log` returned.
        output: a `.png` (the overview; pages beside it as
            `<stem>-p01.png`, ... when there are more than
            `layers_per_page` layers) or a `.pdf` (all pages).
        run: which run of the file, as a list index. Defaults to -1, the last.
        layers: the layers to draw: names or glob patterns, matched at any
            depth (`"conv*"`), paths from the top (`"backbone/block_3*"`) or
            `"all"`, as in the callbacks. Defaults to `None`, all.
        phases: phases to draw. Defaults to `None`, all in the run.
        dpi: resolution. Defaults to 80.
        layers_per_page: most layers on a detail page. Defaults to 30.
        storage_options: for a `log` URL, the fsspec file system's options.
            Defaults to `None`.

    Returns:
        The files written, the overview first.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the run, a layer pattern or a phase is not in the log.
    """
    layers_per_page = check_int("layers_per_page", layers_per_page, 1)
    chosen_run, phases, names = _select(log, run, layers, phases, storage_options)
    by_phase = chosen_run["layers"]
    records = {name: {p: by_phase[p].get(name) for p in phases} for name in names}
    title = _title(chosen_run, names, phases)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    pages = [names[i:i + layers_per_page] for i in range(0, len(names), layers_per_page)] or [[]]
    index = {name: i + 1 for i, name in enumerate(names)}
    if len(pages) == 1 and output.suffix.lower() != ".pdf":
        figure = _page(names, records, phases, f"{title}\n{_HISTOGRAMS}", index, dpi,
                       overview=True, detail=names)
        figure.savefig(output, dpi=dpi, bbox_inches="tight")
        return [output]
    figures = [_page(names, records, phases, title, index, dpi, overview=True, detail=[])]
    for number, page in enumerate(pages, start=1):
        heading = (f"{title} — layers {index[page[0]]}–{index[page[-1]]} "
                   f"(page {number} of {len(pages)})\n{_HISTOGRAMS}")
        figures.append(_page(names, records, phases, heading, index, dpi, overview=False,
                             detail=page))
    if output.suffix.lower() == ".pdf":
        from matplotlib.backends.backend_pdf import PdfPages

        with PdfPages(output) as pdf:
            for figure in figures:
                pdf.savefig(figure, bbox_inches="tight")
        return [output]
    written = [output]
    figures[0].savefig(output, dpi=dpi, bbox_inches="tight")
    for number, figure in enumerate(figures[1:], start=1):
        path = output.with_name(f"{output.stem}-p{number:02d}{output.suffix or '.png'}")
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
        written.append(path)
    return written


def plot_activation_log(
    log: str | os.PathLike | list[dict[str, Any]],
    output: str | os.PathLike,
    *,
    run: int = -1,
    layers: Sequence[str] | None = None,
    phases: Sequence[str] | None = None,
    dpi: int = 80,
    layers_per_page: int = 30,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Draws an activation log as `write_activation_report` does; returns the first file.

    With more than `layers_per_page` layers, `output` is the overview and
    the detail pages are written beside it (`write_activation_report`
    returns all the names). Arguments as there.
    """
    return write_activation_report(
        log, output, run=run, layers=layers, phases=phases, dpi=dpi,
        layers_per_page=layers_per_page, storage_options=storage_options,
    )[0]


_HISTOGRAMS = ("Histograms: the share of each logged epoch's (sampled) values per bin, over "
               "that epoch's edges (gray: outside them), square-root color scale")
# Heights in inches.
_TITLE_IN, _OVERVIEW_ROW_IN, _BAR_GAP_IN, _BAR_IN, _LEGEND_LINE_IN = 0.95, 0.13, 0.55, 0.12, 0.12
_DETAIL_ROW_IN, _DETAIL_GAP_IN = 1.5, 0.5


def _page(names, records, phases, title, index, dpi, *, overview: bool, detail: Sequence[str]):
    """One figure: the overview of `names` (if `overview`), then the rows of `detail`."""
    prefix = panels.common_prefix(names) if overview else ""
    labels = [f"{index[n]:>3}  {panels.short_label(n, prefix)}" for n in names]
    shortened = [n for n in names if panels.short_label(n, prefix) != panels.strip(n, prefix)]
    stats = _overview_statistics(records, names, phases) if overview else []
    width = max(2.4 * 2 + 4.6 * len(phases), 1.3 * len(stats) * len(phases) + 1.0)
    rows_in = _OVERVIEW_ROW_IN * len(names) if overview else 0.0
    legend_in = (_LEGEND_LINE_IN * (len(shortened) + 1) + 0.2) if shortened else 0.0
    overview_in = (rows_in + _BAR_GAP_IN + _BAR_IN + 0.45 + legend_in) if overview else 0.0
    detail_in = (_DETAIL_ROW_IN * len(detail) + _DETAIL_GAP_IN) if detail else 0.0
    height = _TITLE_IN + overview_in + detail_in
    figure = _pyplot_free_figure(width, height, dpi)
    if prefix:
        title += f"\nlabels '…/name' stand for '{prefix}name'"
    figure.text(0.5, 1 - 0.12 / height, title, fontsize=10, ha="center", va="top")
    if overview:
        _draw_overview(figure, names, records, phases, stats, labels, shortened,
                       top_in=_TITLE_IN, rows_in=rows_in, height=height)
    if detail:
        _draw_detail(figure, detail, records, index, top_in=_TITLE_IN + overview_in,
                     height=height)
    return figure


def _overview_statistics(records, names, phases) -> list[tuple[str, str, str]]:
    stats = list(panels.OVERVIEW)
    if any(r is not None and np.any(r["nonfinite_frac"] > 0)
           for n in names for r in records[n].values()):
        stats.append(("nonfinite_frac", "fraction of non-finite values", "Reds"))
    return stats


def _draw_overview(figure, names, records, phases, stats, labels, shortened, *, top_in,
                   rows_in, height) -> None:
    from matplotlib.ticker import MaxNLocator

    columns = len(stats) * len(phases)
    left, right = 0.02, 0.99  # the labels extend left of the figure: bbox_inches="tight"
    grid = figure.add_gridspec(1, columns, left=left, right=right, wspace=0.08,
                               top=1 - top_in / height, bottom=1 - (top_in + rows_in) / height)
    bar_top = top_in + rows_in + _BAR_GAP_IN
    bars = figure.add_gridspec(1, len(stats), left=left, right=right, wspace=0.25,
                               top=1 - bar_top / height, bottom=1 - (bar_top + _BAR_IN) / height)
    epochs = np.unique(np.concatenate(
        [r["epoch"] for n in names for r in records[n].values() if r is not None] or [[0]]
    ))
    for s, (statistic, label, cmap) in enumerate(stats):
        tables = [panels.overview_values([records[n][p] for n in names], statistic, epochs)
                  for p in phases]
        scale = np.concatenate(tables, axis=1)
        for k, (phase, table) in enumerate(zip(phases, tables)):
            column = s * len(phases) + k
            ax = figure.add_subplot(grid[0, column])
            mesh = panels.draw_overview_panel(ax, table, epochs, statistic, cmap, scale)
            ax.set_title(f"{label}\n{phase}" if k == 0 else f"\n{phase}", fontsize=8,
                         loc="left" if k == 0 else "center")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
            ax.tick_params(labelsize=6, length=2)
            ax.set_xlabel("epoch", fontsize=7)
            if column == 0:
                ax.set_yticks(np.arange(len(names)), labels, fontsize=6.5, family="monospace")
            else:
                ax.set_yticks([])
        bar = figure.colorbar(mesh, cax=figure.add_subplot(bars[0, s]), orientation="horizontal")
        panels.tidy_colorbar(bar, statistic)
    if shortened:
        lines = [f"{names.index(n) + 1:>3}  {n}" for n in shortened]
        y = 1 - (bar_top + _BAR_IN + 0.45) / height
        figure.text(0.02, y, "Shortened labels in full:\n" + "\n".join(lines), fontsize=6.5,
                    family="monospace", va="top", ha="left")


def _draw_detail(figure, detail, records, index, *, top_in, height) -> None:
    phases = list(next(iter(records.values())).keys()) if records else []
    grid = figure.add_gridspec(
        len(detail), 2 + len(phases), width_ratios=[4.2, 4.2] + [4.6] * len(phases),
        hspace=0.5, wspace=0.25, left=0.02, right=0.99,
        top=1 - (top_in + 0.3) / height, bottom=0.35 / height,
    )
    for row, name in enumerate(detail):
        shape = next((r["output_shape"] for r in records[name].values() if r is not None), ())
        label = f"{index[name]}  {panels.wrapped(name)}\n{tuple(shape)}"
        panels.draw_layer_row(figure, grid, row, label, records[name], first=row == 0,
                              last=row == len(detail) - 1)
