"""Evaluation figures as PNGs, drawn with PIL (no plotting dependency): line charts (ROC curves,
loss curves), a retrieval example grid, and box / heat-map overlays on images."""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "confusion_grid",
    "overlay_regions",
    "plot_bars",
    "plot_lines",
    "plot_loss_curves",
    "plot_roc_curves",
    "retrieval_grid",
    "roc_curve_points",
    "save_figure",
]

COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
_GREEN, _RED, _YELLOW = (0, 200, 0), (230, 30, 30), (255, 215, 0)


def save_figure(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _framed_canvas(size: tuple[int, int], margins: tuple[int, int, int, int], title: str, y_range: tuple[float, float],
                   y_of: Any, digits: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white canvas with the title, the plot frame inside `margins` (left, right, top, bottom) and
    five y ticks over `y_range`, placed by `y_of(value) -> pixel row`."""
    width, height = size
    left, right, top, bottom = margins
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    low, high = y_range
    for tick in range(5):
        value = low + (high - low) * tick / 4
        draw.line([left - 5, y_of(value), left, y_of(value)], fill="black")
        draw.text((8, y_of(value) - 6), f"{value:.{digits}f}", fill="black")
    return image, draw


def plot_lines(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str,
    x_label: str,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    markers: Sequence[tuple[str, float]] = (),
    diagonal: bool = False,
    size: tuple[int, int] = (900, 520),
) -> Path:
    """A line per series (`name -> [(x, y)]`, drawn in x order), a legend, dashed vertical `markers`
    (`(label, x)`) and, with `diagonal`, the dotted y = x line. Axis ranges default to the data's.
    Writes and returns `path`."""
    points = [point for values in series.values() for point in values]
    if not points:
        raise ValueError("plot_lines needs at least one point")
    width, height = size
    left, right, top, bottom = 70, 230, 40, 50
    x_low, x_high = x_range or (min(min(x for x, _ in points), min((x for _, x in markers), default=np.inf)),
                                max(max(x for x, _ in points), max((x for _, x in markers), default=-np.inf)))
    y_low, y_high = y_range or (min(y for _, y in points), max(y for _, y in points))
    if x_high - x_low < 1e-12:
        x_high = x_low + 1.0
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.5, y_high + 0.5

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (width - left - right) * (x - x_low) / (x_high - x_low),
                top + (height - top - bottom) * (y_high - y) / (y_high - y_low))

    image, draw = _framed_canvas(size, (left, right, top, bottom), title, (y_low, y_high), lambda y: xy(x_low, y)[1], 3)
    for tick in range(6):
        value = x_low + (x_high - x_low) * tick / 5
        x, _ = xy(value, y_low)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 12, height - bottom + 8), f"{value:.4g}", fill="black")
    draw.text(((width - right) / 2, height - 18), x_label, fill="black")
    if diagonal:
        start, end = xy(max(x_low, y_low), max(x_low, y_low)), xy(min(x_high, y_high), min(x_high, y_high))
        for step in range(0, 100, 2):  # dotted
            a, b = step / 100, (step + 1) / 100
            draw.line([start[0] + a * (end[0] - start[0]), start[1] + a * (end[1] - start[1]),
                       start[0] + b * (end[0] - start[0]), start[1] + b * (end[1] - start[1])], fill=(150, 150, 150))
    for label, value in markers:
        x, _ = xy(value, y_low)
        for y in range(top, height - bottom, 8):  # dashed
            draw.line([x, y, x, min(y + 4, height - bottom)], fill=(120, 120, 120))
        draw.text((x + 3, top + 3), label, fill=(90, 90, 90))
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        line = [xy(x, y) for x, y in sorted(values)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend_y = top + 16 * index
        draw.line([width - right + 12, legend_y + 6, width - right + 32, legend_y + 6], fill=colour, width=3)
        draw.text((width - right + 38, legend_y), name, fill="black")
    return save_figure(image, path)


def plot_bars(
    groups: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str,
    y_range: tuple[float, float] = (0.0, 1.0),
    size: tuple[int, int] = (900, 420),
) -> Path:
    """Grouped bars: per group (`name -> {series: value}`, e.g. a class's accuracy and its chance
    rate) one bar per series, coloured by series, with a legend and the value over each bar.
    Writes and returns `path`."""
    if not groups:
        raise ValueError("plot_bars needs at least one group")
    series = list(dict.fromkeys(name for values in groups.values() for name in values))
    width, height = size
    left, right, top, bottom = 60, 160, 40, 60
    low, high = y_range
    slot = (width - left - right) / len(groups)
    bar = slot * 0.8 / len(series)

    def y_of(value: float) -> float:
        return top + (height - top - bottom) * (high - min(max(value, low), high)) / (high - low)

    image, draw = _framed_canvas(size, (left, right, top, bottom), title, (low, high), y_of, 2)
    for index, (group, values) in enumerate(groups.items()):
        x = left + slot * index + slot * 0.1
        for position, name in enumerate(series):
            if name not in values or values[name] is None or math.isnan(values[name]):
                continue
            x0 = x + bar * position
            draw.rectangle([x0, y_of(values[name]), x0 + bar - 2, y_of(low)], fill=COLOURS[position % len(COLOURS)])
            draw.text((x0, y_of(values[name]) - 12), f"{values[name]:.2f}", fill="black")
        draw.text((x, height - bottom + 8), group[:18], fill="black")
    for position, name in enumerate(series):
        legend_y = top + 16 * position
        draw.rectangle([width - right + 12, legend_y + 2, width - right + 26, legend_y + 12],
                       fill=COLOURS[position % len(COLOURS)])
        draw.text((width - right + 32, legend_y), name, fill="black")
    return save_figure(image, path)


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


def plot_roc_curves(
    curves: Mapping[str, tuple[Any, Any]], aurocs: Mapping[str, float], path: str | Path, title: str
) -> Path:
    """One ROC curve per class (`name -> (scores, labels)`), the AUROC in the legend."""
    series = {f"{name} ({aurocs[name]:.3f})": points for name, (scores, labels) in curves.items()
              if (points := roc_curve_points(scores, labels))}
    if not series:
        raise ValueError("no class has both a positive and a negative: nothing to plot")
    return plot_lines(series, path, title, "false-positive rate (y: true-positive rate)",
                      x_range=(0.0, 1.0), y_range=(0.0, 1.0), diagonal=True)


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


def confusion_grid(matrix: Any, labels: Sequence[str], path: str | Path, title: str, cell: int = 34) -> Path:
    """A confusion matrix `(C, C)` (rows: reference, columns: prediction) as a grid of cells shaded by
    each row's fraction, with the counts written in."""
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape != (len(labels), len(labels)) or not len(labels):
        raise ValueError(f"matrix {counts.shape} must be (C, C) with C = {len(labels)} labels (>= 1)")
    left, top = 150, 40 + 8 * max(len(label) for label in labels)
    size = len(labels) * cell
    image = Image.new("RGB", (left + size + 20, top + size + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill="black")
    draw.text((4, top - 14), "reference \\ predicted", fill=(90, 90, 90))
    totals = np.maximum(counts.sum(1, keepdims=True), 1)
    for row, label in enumerate(labels):
        draw.text((4, top + row * cell + cell // 3), label[:22], fill="black")
        for column in range(len(labels)):
            share = counts[row, column] / totals[row, 0]
            shade = int(255 - 200 * share)
            x, y = left + column * cell, top + row * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            if counts[row, column]:
                draw.text((x + 4, y + cell // 3), str(counts[row, column]), fill="black" if share < 0.6 else "white")
    for column, label in enumerate(labels):  # column labels, written downwards one character per line
        for index, character in enumerate(label[:8]):
            draw.text((left + column * cell + cell // 3, 30 + 8 * index), character, fill="black")
    return save_figure(image, path)


def plot_loss_curves(
    series: dict[str, Sequence[tuple[int, float]]],
    boundaries: Sequence[tuple[str, int]],
    path: str | Path,
    title: str = "training losses",
) -> Path:
    """series: name -> [(step, value)]; boundaries: [(stage name, first step)]. Writes and returns `path`."""
    if not any(series.values()):
        raise ValueError("plot_loss_curves needs at least one logged value")
    last_step = max(max(step for values in series.values() for step, _ in values),
                    max((start for _, start in boundaries), default=0), 1)
    return plot_lines(series, path, title, "step", x_range=(0, last_step), markers=boundaries)
