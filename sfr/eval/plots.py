"""Report figures as PNG bytes: measures versus anticipation time, and fusion attention weights.

matplotlib is an optional dependency (`sfr[report]`), imported only when a figure is drawn. The
figures are built on `matplotlib.figure.Figure` with the Agg canvas (no pyplot, no backend
switch) under the default style plus ours, and saved without metadata, so identical inputs give
identical bytes whatever the user's matplotlibrc says.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sfr.errors import SfrError, install_extra

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 150
CURVES_SIZE = (10.0, 3.6)  # inches: three panels side by side, one legend row below
LEGEND_COLUMNS = 3
LEGEND_ROW_HEIGHT = 0.22  # inches added per further legend row, so the panels keep their size
ATTENTION_SIZE = (6.0, 3.6)
# Okabe-Ito colours (distinguishable with colour-vision deficiencies, yellow left out: too pale
# on white); 8 colours against 7 markers give 56 distinct styles before one repeats.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
TIME_LABEL = "anticipation time τ (s)"
RATIO_LABEL = "observed part of the action (%)"
MAX_TIME_LABELS = 8  # labelled ticks on a time axis
STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 12,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
}


@dataclass(frozen=True)
class Curve:
    """One model's values at its own anticipation times (None where undefined: a gap).

    `style` picks colour and marker, so that a model looks the same in every figure.
    """

    label: str
    times: Sequence[float]
    values: Sequence[float | None]
    style: int


def curves_png(
    panels: Mapping[str, Sequence[Curve]],
    ylabel: str,
    title: str,
    *,
    task: str = "anticipation",
) -> bytes:
    """One panel per entry of `panels` (e.g. verb / noun / action), one line per curve."""
    matplotlib = require_matplotlib()
    labels = {curve.label for curves in panels.values() for curve in curves}
    extra_rows = max(0, math.ceil(len(labels) / LEGEND_COLUMNS) - 1)
    width, height = CURVES_SIZE
    with matplotlib.style.context(["default", STYLE]):
        figure = _figure((width, height + extra_rows * LEGEND_ROW_HEIGHT))
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        handles: dict[str, Any] = {}
        for ax, (panel, curves) in zip(axes, panels.items()):
            for curve in curves:
                values = [float("nan") if v is None else v for v in curve.values]
                (line,) = ax.plot(
                    curve.times,
                    values,
                    color=COLOURS[curve.style % len(COLOURS)],
                    marker=MARKERS[curve.style % len(MARKERS)],
                    label=curve.label,
                )
                handles.setdefault(curve.label, line)
            ax.set_title(panel)
            _time_axis(ax, [t for curve in curves for t in curve.times], pad=0.05, task=task)
            if "%" in ylabel:
                ax.set_ylim(*percent_limits(*ax.get_ylim()))
        axes[0].set_ylabel(ylabel)
        axes[len(axes) // 2].set_xlabel(_axis_label(task))
        figure.suptitle(title)
        figure.legend(
            handles.values(),
            handles.keys(),
            loc="outside lower center",
            ncols=min(len(handles), LEGEND_COLUMNS),
            frameon=False,
        )
        return _png(figure)


def attention_png(
    times: Sequence[float],
    inputs: Sequence[str],
    weights: Sequence[Sequence[float]],
    title: str,
    *,
    task: str = "anticipation",
) -> bytes:
    """Mean attention weight of each input versus anticipation time, as stacked areas (0 to 1).

    `weights` has one row per time and one column per input; each row sums to 1.
    """
    matplotlib = require_matplotlib()
    with matplotlib.style.context(["default", STYLE]):
        figure = _figure(ATTENTION_SIZE)
        ax = figure.add_subplot()
        columns = [[row[i] for row in weights] for i in range(len(inputs))]
        colours = [COLOURS[i % len(COLOURS)] for i in range(len(inputs))]
        areas = ax.stackplot(
            times, columns, labels=inputs, colors=colours, alpha=0.8, edgecolor="white"
        )
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("mean attention weight")
        ax.set_xlabel(_axis_label(task))
        ax.set_title(title)
        ax.grid(False)
        _time_axis(ax, times, pad=0.0, task=task)
        figure.legend(
            areas, inputs, loc="outside lower center", ncols=min(len(inputs), 4), frameon=False
        )
        return _png(figure)


def percent_limits(bottom: float, top: float) -> tuple[float, float]:
    """Axis limits of a percentage kept within 0-100 (a little room above 100 for the markers)."""
    return max(bottom, 0.0), min(top, 100.5)


def require_matplotlib() -> Any:
    """The matplotlib package, or an SfrError saying how to install it."""
    try:
        import matplotlib
        import matplotlib.style
    except ImportError:
        raise SfrError(
            "Plotting the report needs matplotlib, which is not installed.",
            install_extra("report"),
        ) from None
    return matplotlib


def _figure(size: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas (no pyplot state), laid out by the constrained engine."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _axis_label(task: str) -> str:
    return RATIO_LABEL if task == "early_recognition" else TIME_LABEL


def _time_axis(ax: Axes, times: Sequence[float], pad: float, task: str = "anticipation") -> None:
    """Ticks at the anticipation times, the largest on the left (the action happens on the right),
    with `pad` (a fraction of the span) of room on either side.

    Beyond MAX_TIME_LABELS times, every k-th time from the largest is labelled and the others get
    an unlabelled minor tick, so labels never overlap (16 times at 0.125 s: labels every 0.25 s).
    """
    early = task == "early_recognition"  # observed ratios: the smallest on the left
    ticks = sorted(set(times), reverse=not early)
    every = math.ceil(len(ticks) / MAX_TIME_LABELS)
    labels = [f"{100 * t:g}" if early else f"{t:g}" for t in ticks[::every]]
    ax.set_xticks(ticks[::every], labels)
    ax.set_xticks([t for i, t in enumerate(ticks) if i % every], minor=True)
    span = abs(ticks[0] - ticks[-1])
    room = pad * span if span > 0 else 0.25 * ticks[0]
    direction = -1 if early else 1  # anticipation: the axis runs from the largest time down
    ax.set_xlim(ticks[0] + direction * room, ticks[-1] - direction * room)


def _png(figure: Figure) -> bytes:
    """The figure as PNG bytes, without the Software tag, so equal figures give equal bytes."""
    buffer = io.BytesIO()
    figure.canvas.print_png(buffer, metadata={"Software": None})  # one layout, one draw
    return buffer.getvalue()
