"""Evaluation and training figures as PNGs.

Charts (line charts with ROC and loss curves as special cases, grouped bars, a confusion grid) are
drawn with matplotlib on its Agg canvas; each has a `*_figure` builder that returns the
`matplotlib.figure.Figure` (what the tests inspect) and a `plot_*` / `confusion_grid` function that
writes it. Pictures of images (the retrieval example grid, box and heat-map overlays) stay in PIL.
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "bar_figure",
    "confusion_figure",
    "confusion_grid",
    "line_figure",
    "loss_figure",
    "overlay_regions",
    "plot_bars",
    "plot_lines",
    "plot_loss_curves",
    "plot_roc_curves",
    "retrieval_grid",
    "roc_curve_points",
    "roc_figure",
    "save_figure",
]

# matplotlib's tab10, as 0-255 RGB so that the PIL overlays and the charts share one palette.
COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_GREEN, _RED = (0, 200, 0), (230, 30, 30)
_DPI = 100  # sizes are given in pixels; at this dpi a (900, 520) figure is a 900 x 520 PNG
_LABEL_CHARACTERS = 20  # longer class / answer names are cut so that the plot keeps its room


def _colour(index: int) -> tuple[float, float, float]:
    red, green, blue = COLOURS[index % len(COLOURS)]
    return red / 255, green / 255, blue / 255


def _shorten(label: str) -> str:
    return label if len(label) <= _LABEL_CHARACTERS else label[: _LABEL_CHARACTERS - 1] + "…"


def _figure(size: tuple[int, int], title: str) -> tuple[Figure, Axes]:
    """A `size`-pixel figure with one titled axes. The Agg canvas is attached explicitly rather than
    through pyplot, so no global backend or pyplot state is touched (safe in threads, any backend)."""
    figure = Figure(figsize=(size[0] / _DPI, size[1] / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title, wrap=True)  # a long title (the pointing game's) wraps instead of being cut
    return figure, axes


def _legend_outside(axes: Axes) -> None:
    """The legend to the right of the plot, where it never hides a curve or a bar."""
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")


def save_figure(figure: Image.Image | Figure, path: str | Path) -> Path:
    """Writes a PIL picture or a matplotlib figure (at its own size) to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(figure, Figure):
        figure.savefig(path, dpi=figure.dpi)
    else:
        figure.save(path)
    return path


def line_figure(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str,
    *,
    y_label: str = "",
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    markers: Sequence[tuple[str, float]] = (),
    diagonal: bool = False,
    size: tuple[int, int] = (900, 520),
) -> Figure:
    """A line per series (`name -> [(x, y)]`, drawn in x order; a lone point as a dot), a legend,
    dashed vertical `markers` (`(label, x)`) labelled at the top and, with `diagonal`, the dotted
    y = x chance line. Axis ranges default to the data's."""
    if not any(series.values()):
        raise ValueError("plot_lines needs at least one point")
    figure, axes = _figure(size, title)
    for index, (name, values) in enumerate(series.items()):
        if values:
            x, y = zip(*sorted(values), strict=True)
            axes.plot(x, y, color=_colour(index), linewidth=2, marker="o" if len(x) == 1 else None, label=name)
    if diagonal:
        axes.axline((0.0, 0.0), slope=1.0, color="0.5", linestyle=":", linewidth=1.5, label="chance")
    for label, value in markers:
        axes.axvline(value, color="0.45", linestyle="--", linewidth=1)
        axes.annotate(label, xy=(value, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -4),
                      textcoords="offset points", rotation=90, ha="left", va="top", fontsize="small", color="0.3")
    if x_range is not None:
        axes.set_xlim(*x_range)
    if y_range is not None:
        axes.set_ylim(*y_range)
    axes.set(xlabel=x_label, ylabel=y_label)
    axes.grid(alpha=0.3)
    _legend_outside(axes)
    return figure


def plot_lines(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str, x_label: str,
               **options: Any) -> Path:
    """Writes `line_figure(series, title, x_label, **options)` to `path` and returns it."""
    return save_figure(line_figure(series, title, x_label, **options), path)


def bar_figure(
    groups: Mapping[str, Mapping[str, float]],
    title: str,
    *,
    y_label: str = "",
    y_range: tuple[float, float] = (0.0, 1.0),
    size: tuple[int, int] = (900, 420),
) -> Figure:
    """Grouped bars: per group (`name -> {series: value}`, e.g. a class's accuracy and its chance
    rate) one bar per series, coloured by series, with a legend and the value over each bar. A
    missing, None or NaN value leaves its slot empty."""
    if not groups:
        raise ValueError("plot_bars needs at least one group")
    series = list(dict.fromkeys(name for values in groups.values() for name in values))
    width = 0.8 / len(series)
    upright = len(groups) * len(series) > 12  # narrow bars: upright values do not run into their neighbours'
    figure, axes = _figure(size, title)
    for position, name in enumerate(series):
        slots = [(index, values[name]) for index, values in enumerate(groups.values())
                 if values.get(name) is not None and not math.isnan(values[name])]
        x = [index - 0.4 + width * (position + 0.5) for index, _ in slots]
        bars = axes.bar(x, [value for _, value in slots], width * 0.95, color=_colour(position), label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize="small", padding=2, rotation=90 if upright else 0)
    low, high = y_range
    axes.set_ylim(low, high + (0.15 if upright else 0.08) * (high - low))  # room for a full-height bar's value
    axes.set_xticks(range(len(groups)), [_shorten(group) for group in groups], rotation=30, ha="right",
                    rotation_mode="anchor")
    axes.set(ylabel=y_label)
    axes.grid(axis="y", alpha=0.3)
    _legend_outside(axes)
    return figure


def plot_bars(groups: Mapping[str, Mapping[str, float]], path: str | Path, title: str, **options: Any) -> Path:
    """Writes `bar_figure(groups, title, **options)` to `path` and returns it."""
    return save_figure(bar_figure(groups, title, **options), path)


def roc_curve_points(scores: Any, labels: Any) -> list[tuple[float, float]]:
    """The ROC curve of `scores` `(N,)` against 0/1 `labels` `(N,)`: `[(false-positive rate,
    true-positive rate)]` from (0, 0) to (1, 1), one point per distinct score (tied scores move
    diagonally, as the AUROC counts them). Empty when a class has no positive or no negative."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    positives, negatives = labels.sum(), (1 - labels).sum()
    if positives == 0 or negatives == 0:
        return []
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]
    tpr = np.cumsum(labels)[last_of_tie] / positives
    fpr = np.cumsum(1 - labels)[last_of_tie] / negatives
    return [(0.0, 0.0), *zip(fpr.tolist(), tpr.tolist(), strict=True)]


def roc_figure(curves: Mapping[str, tuple[Any, Any]], aurocs: Mapping[str, float], title: str) -> Figure:
    """One ROC curve per class (`name -> (scores, labels)`) with its AUROC in the legend, over the
    chance diagonal; a class without both a positive and a negative is left out."""
    series = {f"{name} (AUROC {aurocs[name]:.3f})": points for name, (scores, labels) in curves.items()
              if (points := roc_curve_points(scores, labels))}
    if not series:
        raise ValueError("no class has both a positive and a negative: nothing to plot")
    figure = line_figure(series, title, "false-positive rate", y_label="true-positive rate", x_range=(0.0, 1.0),
                         y_range=(0.0, 1.0), diagonal=True)
    figure.axes[0].set_aspect("equal")  # both axes are rates: a square plot keeps the diagonal at 45 degrees
    return figure


def plot_roc_curves(
    curves: Mapping[str, tuple[Any, Any]], aurocs: Mapping[str, float], path: str | Path, title: str
) -> Path:
    """Writes `roc_figure(...)` to `path` and returns it."""
    return save_figure(roc_figure(curves, aurocs, title), path)


def confusion_figure(matrix: Any, labels: Sequence[str], title: str, cell: int = 34) -> Figure:
    """A confusion matrix `(C, C)` (rows: reference, columns: prediction) as cells shaded by each
    row's fraction, with the non-zero counts written in; `cell` pixels per cell plus room for labels."""
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape != (len(labels), len(labels)) or not len(labels):
        raise ValueError(f"matrix {counts.shape} must be (C, C) with C = {len(labels)} labels (>= 1)")
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = len(labels) * cell
    figure, axes = _figure((side + 330, side + 220), title)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, column), count in np.ndenumerate(counts):
        if count:
            axes.text(column, row, str(count), ha="center", va="center", fontsize="small",
                      color="white" if shares[row, column] >= 0.6 else "black")
    names = [_shorten(label) for label in labels]
    axes.set_xticks(range(len(labels)), names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(len(labels)), names)
    axes.set(xlabel="predicted", ylabel="reference")
    figure.colorbar(image, ax=axes, label="share of the reference row", shrink=0.8)
    return figure


def confusion_grid(matrix: Any, labels: Sequence[str], path: str | Path, title: str, cell: int = 34) -> Path:
    """Writes `confusion_figure(...)` to `path` and returns it."""
    return save_figure(confusion_figure(matrix, labels, title, cell), path)


def loss_figure(
    series: Mapping[str, Sequence[tuple[int, float]]], boundaries: Sequence[tuple[str, int]],
    title: str = "training losses",
) -> Figure:
    """series: name -> [(step, value)]; boundaries: [(stage name, first step)], drawn as dashed
    vertical lines labelled with the stage name."""
    if not any(series.values()):
        raise ValueError("plot_loss_curves needs at least one logged value")
    last_step = max(max(step for values in series.values() for step, _ in values),
                    max((start for _, start in boundaries), default=0), 1)
    return line_figure(series, title, "step", y_label="loss", x_range=(0, last_step), markers=boundaries)


def plot_loss_curves(
    series: Mapping[str, Sequence[tuple[int, float]]],
    boundaries: Sequence[tuple[str, int]],
    path: str | Path,
    title: str = "training losses",
) -> Path:
    """Writes `loss_figure(...)` to `path` and returns it."""
    return save_figure(loss_figure(series, boundaries, title), path)


# Pictures of images are drawn with PIL: they keep the film's own pixels (no resampling through a
# figure's dpi), and the tasks paste them into sheets as images.


def _thumbnail(image: Image.Image, side: int) -> Image.Image:
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side))
    canvas = Image.new("RGB", (side, side), "black")
    canvas.paste(thumb, ((side - thumb.width) // 2, (side - thumb.height) // 2))
    return canvas


def retrieval_grid(
    queries: Sequence[str],
    ranked_images: Sequence[Sequence[Image.Image]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    side: int = 128,
) -> Path:
    """Text->image examples: per row the query text, then its top-ranked images left to right, the
    true image framed green and the others red."""
    if not (len(queries) == len(ranked_images) == len(correct)) or not queries:
        raise ValueError("retrieval_grid needs as many (>= 1) queries, image rankings and correctness rows")
    columns = max(len(row) for row in ranked_images)
    text_width, pad = 260, 6
    grid = Image.new("RGB", (text_width + columns * (side + pad), len(queries) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for row, (query, images, hits) in enumerate(zip(queries, ranked_images, correct, strict=True)):
        y = pad + row * (side + pad)
        words, line, lines = query.split(), "", []
        for word in words:  # wrap at ~40 characters
            if len(line) + len(word) > 40:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        for number, text in enumerate(lines[: side // 12]):
            draw.text((4, y + 12 * number), text, fill="black")
        for column, (image, hit) in enumerate(zip(images, hits, strict=True)):
            x = text_width + column * (side + pad)
            grid.paste(_thumbnail(image, side), (x, y))
            draw.rectangle([x, y, x + side - 1, y + side - 1], outline=_GREEN if hit else _RED, width=3)
    return save_figure(grid, path)


def overlay_regions(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    captions: Sequence[str],
    colours: Sequence[tuple[int, int, int]],
    heatmap: np.ndarray | None = None,
    title: str = "",
    side: int = 384,
) -> Image.Image:
    """The image scaled to `side` with `boxes` (xyxy pixels of `image`) outlined in `colours` and
    labelled with `captions`; an optional `heatmap` `(h, w)` (any range, the image's aspect at any
    resolution, e.g. `proposal_heatmap`'s) is blended in
    red-yellow over the image. Returns the picture (save it with `save_figure`)."""
    if not (len(boxes) == len(captions) == len(colours)):
        raise ValueError("overlay_regions needs one caption and one colour per box")
    scale = side / max(image.size)
    picture = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    if heatmap is not None:
        values = np.asarray(heatmap, dtype=np.float64)
        if values.ndim != 2 or abs(values.shape[0] / values.shape[1] - image.height / image.width) > 0.05:
            raise ValueError(f"heatmap shape {values.shape} must be 2-D with the image's aspect (H, W) = "
                             f"{(image.height, image.width)}")
        span = values.max() - values.min()
        values = (values - values.min()) / span if span > 0 else np.zeros_like(values)
        heat = np.stack([255 * np.ones_like(values), 255 * values, np.zeros_like(values)], axis=-1).astype(np.uint8)
        heat_image = Image.fromarray(heat).resize(picture.size)
        alpha = Image.fromarray((160 * values).astype(np.uint8)).resize(picture.size)
        picture.paste(heat_image, (0, 0), alpha)
    canvas = Image.new("RGB", (picture.width, picture.height + 18), "white")
    canvas.paste(picture, (0, 18))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), title, fill="black")
    for box, caption, colour in zip(boxes, captions, colours, strict=True):
        x0, y0, x1, y1 = (value * scale for value in box)
        draw.rectangle([x0, y0 + 18, x1, y1 + 18], outline=colour, width=2)
        draw.text((x0 + 2, max(18, y0 + 18 - 12)), caption, fill=colour)
    return canvas
