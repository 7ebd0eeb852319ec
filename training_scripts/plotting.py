"""Loss curves as a PNG: one line per loss term, stage boundaries as dashed vertical lines with
the stage names (drawn by `evaluation.figures.plot_lines`, PIL only)."""

from collections.abc import Sequence
from pathlib import Path

from evaluation.figures import plot_lines

__all__ = ["plot_loss_curves"]


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
