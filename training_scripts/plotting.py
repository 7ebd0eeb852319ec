"""Loss curves as a PNG, drawn with PIL (no plotting dependency): one line per loss term, stage
boundaries as dashed vertical lines with the stage names."""

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["plot_loss_curves"]

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_loss_curves(
    series: dict[str, Sequence[tuple[int, float]]],
    boundaries: Sequence[tuple[str, int]],
    path: str | Path,
    title: str = "training losses",
    size: tuple[int, int] = (900, 520),
) -> Path:
    """series: name -> [(step, value)]; boundaries: [(stage name, first step)]. Writes and returns `path`."""
    points = [(step, value) for values in series.values() for step, value in values]
    if not points:
        raise ValueError("plot_loss_curves needs at least one logged value")
    width, height = size
    left, right, top, bottom = 70, 190, 40, 50
    max_step = max(max(step for step, _ in points), max((start for _, start in boundaries), default=0), 1)
    low, high = min(v for _, v in points), max(v for _, v in points)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / max_step
        y = top + (height - top - bottom) * (high - value) / (high - low)
        return x, y

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in range(5):  # y ticks
        value = low + (high - low) * tick / 4
        _, y = xy(0, value)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((8, y - 6), f"{value:.3f}", fill="black")
    for tick in range(6):  # x ticks
        step = max_step * tick / 5
        x, _ = xy(step, low)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 12, height - bottom + 8), f"{int(step)}", fill="black")
    draw.text(((width - right) / 2, height - 18), "step", fill="black")
    for name, start in boundaries:
        x, _ = xy(start, low)
        for y in range(top, height - bottom, 8):  # dashed
            draw.line([x, y, x, min(y + 4, height - bottom)], fill=(120, 120, 120))
        draw.text((x + 3, top + 3), name, fill=(90, 90, 90))
    for index, (name, values) in enumerate(series.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        line = [xy(step, value) for step, value in sorted(values)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend_y = top + 16 * index
        draw.line([width - right + 12, legend_y + 6, width - right + 32, legend_y + 6], fill=colour, width=3)
        draw.text((width - right + 38, legend_y), name, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
