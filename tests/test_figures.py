"""The charts of regionmed_clip/figures.py: the matplotlib figure holds the data it was given (lines,
bars, cells, legend, labels, computed here independently), and the PNG written from it has the
agreed size, is not blank and changes with the data."""

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from regionmed_clip.figures import (
    COLOURS,
    bar_figure,
    confusion_figure,
    confusion_grid,
    line_figure,
    loss_figure,
    plot_bars,
    plot_lines,
    plot_loss_curves,
    plot_roc_curves,
    roc_figure,
)

RNG = np.random.default_rng(0)
SCORES = {"effusion": RNG.normal(size=60), "nodule": np.round(RNG.normal(size=40), 1)}  # the nodule's tie
LABELS = {"effusion": RNG.random(60) < 0.4, "nodule": RNG.random(40) < 0.5}


def _roc_by_thresholds(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC points from the definition: at each distinct score as the threshold, the share of
    negatives and of positives scored at least that high, after (0, 0)."""
    thresholds = np.unique(scores)[::-1]
    fpr = [(scores[~labels] >= t).mean() for t in thresholds]
    tpr = [(scores[labels] >= t).mean() for t in thresholds]
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def _lines(figure: Figure) -> dict[str, object]:
    return {line.get_label(): line for line in figure.axes[0].get_lines()}


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.int64)


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels are within `tolerance` (sum over channels) of `colour`."""
    return int((np.abs(pixels - np.array(colour)).sum(-1) < tolerance).sum())


# -- what the figures hold ------------------------------------------------------------------------


def test_roc_figure_plots_each_class_curve_with_its_auroc():
    curves = {name: (SCORES[name], LABELS[name]) for name in SCORES} | {"all positive": ([0.2, 0.3], [1, 1])}
    aurocs = {"effusion": 0.6123, "nodule": 0.4, "all positive": float("nan")}
    figure = roc_figure(curves, aurocs, "zero-shot ROC")
    axes = figure.axes[0]
    lines = _lines(figure)
    assert set(lines) == {"effusion (AUROC 0.612)", "nodule (AUROC 0.400)", "chance"}  # no curve for one class
    for name, label in (("effusion", "effusion (AUROC 0.612)"), ("nodule", "nodule (AUROC 0.400)")):
        fpr, tpr = _roc_by_thresholds(SCORES[name], LABELS[name])
        np.testing.assert_allclose(lines[label].get_xdata(), fpr)
        np.testing.assert_allclose(lines[label].get_ydata(), tpr)
    assert lines["chance"].get_xy1() == (0.0, 0.0) and lines["chance"].get_slope() == 1.0
    assert lines["chance"].get_linestyle() == ":"
    assert [text.get_text() for text in axes.get_legend().get_texts()] == list(lines)
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == (
        "zero-shot ROC", "false-positive rate", "true-positive rate")
    assert axes.get_xlim() == (0.0, 1.0) and axes.get_ylim() == (0.0, 1.0)
    with pytest.raises(ValueError, match="nothing to plot"):
        roc_figure({"all positive": ([0.2, 0.3], [1, 1])}, {"all positive": 0.5}, "none")


def test_loss_figure_plots_the_series_and_a_dashed_line_per_stage():
    series = {"loss": [(20, 1.5), (0, 3.0), (10, 2.0)], "loss_region": [(10, 0.9), (20, 0.4)]}
    boundaries = [("global", 0), ("regions", 10), ("full", 25)]
    figure = loss_figure(series, boundaries, "training")
    axes = figure.axes[0]
    lines = _lines(figure)
    for name, points in series.items():  # drawn in step order
        steps, values = zip(*sorted(points), strict=True)
        np.testing.assert_array_equal(lines[name].get_xdata(), steps)
        np.testing.assert_array_equal(lines[name].get_ydata(), values)
    dashed = [line for line in axes.get_lines() if line.get_linestyle() == "--"]
    assert [tuple(line.get_xdata()) for line in dashed] == [(0, 0), (10, 10), (25, 25)]
    assert [(text.get_text(), text.xy[0]) for text in axes.texts] == [(name, step) for name, step in boundaries]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["loss", "loss_region"]
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == ("training", "step", "loss")
    assert axes.get_xlim() == (0.0, 25.0)  # the last boundary lies past the last logged step
    with pytest.raises(ValueError, match="at least one logged value"):
        loss_figure({"loss": []}, boundaries)


def test_line_figure_draws_a_lone_point_as_a_dot():
    figure = line_figure({"one": [(2.0, 5.0)], "two": [(1.0, 1.0), (3.0, 2.0)]}, "t", "x", y_label="y")
    lines = _lines(figure)
    assert lines["one"].get_marker() == "o" and lines["two"].get_marker() in ("None", "", None)
    assert list(lines["one"].get_xydata()[0]) == [2.0, 5.0]
    with pytest.raises(ValueError, match="at least one point"):
        line_figure({"empty": []}, "t", "x")


def test_bar_heights_are_the_values_and_missing_values_leave_gaps():
    groups = {"effusion": {"hit": 0.5, "chance": 0.1}, "nodule": {"hit": 0.9}, "mass": {"hit": 0.25, "chance": None},
              "atelectasis": {"hit": float("nan"), "chance": 0.3}}
    figure = bar_figure(groups, "pointing", y_label="fraction of films")
    axes = figure.axes[0]
    bars = {container.get_label(): container for container in axes.containers}
    assert list(bars) == ["hit", "chance"]
    assert [bar.get_height() for bar in bars["hit"]] == [0.5, 0.9, 0.25]
    assert [bar.get_height() for bar in bars["chance"]] == [0.1, 0.3]
    centres = {name: [bar.get_x() + bar.get_width() / 2 for bar in container] for name, container in bars.items()}
    assert [round(x) for x in centres["hit"]] == [0, 1, 2] and [round(x) for x in centres["chance"]] == [0, 3]
    assert all(hit < chance for hit, chance in zip(centres["hit"], centres["chance"], strict=False))  # hit left
    assert [label.get_text() for label in axes.get_xticklabels()] == list(groups)
    assert sorted(text.get_text() for text in axes.texts) == ["0.10", "0.25", "0.30", "0.50", "0.90"]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["hit", "chance"]
    assert (axes.get_title(), axes.get_ylabel()) == ("pointing", "fraction of films")
    assert bars["hit"].patches[0].get_facecolor()[:3] == pytest.approx([c / 255 for c in COLOURS[0]])


def test_confusion_figure_shades_row_shares_and_writes_the_counts():
    matrix = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    labels = ["yes", "no", "a very long answer that gets shortened"]
    figure = confusion_figure(matrix, labels, "VQA answers")
    axes = figure.axes[0]
    shares = np.array([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]])  # each row over its total
    np.testing.assert_allclose(axes.images[0].get_array(), shares)
    written = {(round(text.get_position()[1]), round(text.get_position()[0])): text.get_text() for text in axes.texts}
    assert written == {(0, 0): "3", (0, 1): "1", (2, 0): "2", (2, 1): "2", (2, 2): "4"}  # zero cells stay empty
    ticks = [label.get_text() for label in axes.get_yticklabels()]
    assert ticks[:2] == ["yes", "no"] and ticks[2].startswith("a very long") and len(ticks[2]) <= 20
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == ("VQA answers", "predicted", "reference")
    with pytest.raises(ValueError, match="must be"):
        confusion_figure(matrix, labels[:2], "wrong shape")


# -- the PNGs ---------------------------------------------------------------------------------------


CHARTS = {
    "roc": (lambda data, path: plot_roc_curves({"c": (data, LABELS["effusion"])}, {"c": 0.5}, path, "roc"),
            SCORES["effusion"], -SCORES["effusion"], (900, 520)),
    "loss": (lambda data, path: plot_loss_curves({"loss": list(enumerate(data))}, [("one", 0), ("two", 5)], path),
             [3.0, 2.0, 1.5, 1.2, 1.0, 0.9, 0.8], [3.0, 2.9, 2.5, 2.5, 2.4, 2.0, 1.0], (900, 520)),
    "lines": (lambda data, path: plot_lines({"time": list(enumerate(data))}, path, "growth", "batch"),
              [1.0, 2.0, 4.0], [1.0, 1.1, 1.2], (900, 520)),
    "bars": (lambda data, path: plot_bars({"a": {"hit": data[0]}, "b": {"hit": data[1]}}, path, "bars"),
             [0.2, 0.9], [0.9, 0.2], (900, 420)),
}


@pytest.mark.parametrize("chart", list(CHARTS))
def test_png_has_its_size_shows_the_data_and_changes_with_it(tmp_path, chart):
    plot, data, other, size = CHARTS[chart]
    first, second = _pixels(plot(data, tmp_path / "a.png")), _pixels(plot(other, tmp_path / "b" / "c.png"))
    assert first.shape == (size[1], size[0], 3) and first.std() > 20  # not a blank canvas
    assert _near(first, COLOURS[0]) > 100  # the first series' colour is on it, not only the frame and text
    assert (first != second).any(-1).sum() > 200  # other data, another picture


def test_confusion_png_shades_with_the_counts(tmp_path):
    diagonal = _pixels(confusion_grid(np.eye(3, dtype=int) * 5, ["a", "b", "c"], tmp_path / "a.png", "t"))
    spread = _pixels(confusion_grid(np.ones((3, 3), dtype=int), ["a", "b", "c"], tmp_path / "b.png", "t"))
    assert diagonal.shape == spread.shape and diagonal.std() > 20
    assert (diagonal != spread).any(-1).sum() > 1000


def test_figures_draw_without_pyplot():
    """No pyplot import, hence no global backend switch or figure registry in the host process."""
    code = ("import sys; from regionmed_clip.figures import roc_figure; "
            "roc_figure({'c': ([1, 0], [1, 0])}, {'c': 1.0}, 't').canvas.draw(); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
