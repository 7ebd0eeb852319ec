"""`regionmed-app` in a real browser (headless Chromium, selenium): a user uploads a film, draws a box over its
lesion with the mouse, presses Analyse and reads the page; a bad upload shows a message and the app keeps
serving; the page loads nothing from outside the app. The model is the session's short training (conftest).

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them): skipped without them, except in CI."""

import os
import shutil
import time

import pytest

from regionmed_clip.apps.app import FilmReader
from regionmed_clip.apps.app_driver import AppPage, browser_available, chromium, start_app, stop_app
from regionmed_clip.apps.export import export_model
from regionmed_clip.data.schema import load_canonical
from regionmed_clip.data.synthetic import LESION_TYPES

from conftest import free_port

pytestmark = pytest.mark.slow

FINDINGS = list(LESION_TYPES)
BOX_TOLERANCE = 3  # film pixels between the box meant and the box the canvas reports (mouse positions are whole pixels)


def _mirrored(box, width):
    return [width - box[2], box[1], width - box[0], box[3]]


def pick_film(reader: FilmReader, rows) -> tuple[int, int]:
    """(row, region) of the first held-out film whose box-free top finding is one of its findings and one of
    whose lesions the model names right from its box, and not from the same box on the other lung (so the
    page can only show that name if the drawn box reaches the model where it was drawn)."""
    for index, row in enumerate(rows):
        labels = [region["label"] for region in row["regions"]]
        if not labels:
            continue
        boxes = [region["bbox"] for region in row["regions"]]
        analysis = reader.analyse(row["image"], FINDINGS, boxes)
        if analysis.findings[0]["label"] not in labels:
            continue
        mirrored = reader.analyse(row["image"], FINDINGS, [_mirrored(box, row["image"].width) for box in boxes])
        for number, (label, reading, other) in enumerate(zip(labels, analysis.boxes, mirrored.boxes, strict=True)):
            if reading.scores[0][0] == label and other.scores[0][0] != label:
                return index, number
    pytest.fail("no held-out film of the short training qualifies (box-free top finding among its findings, a "
                "lesion named right from its box and not from its mirror): the trained model reads no lesion")


@pytest.fixture(scope="module")
def app(short_training, tmp_path_factory):
    if not browser_available():
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: install chromium and chromium-driver (apt-get)")
        pytest.skip("no Chromium / ChromeDriver here: apt-get install chromium chromium-driver")
    root = tmp_path_factory.mktemp("app_browser")
    export_model(short_training.model_dir, root / "hub", repo_id="org/regionmed-tiny")
    rows = [row for split in ("test", "validation") for row in load_canonical(short_training.data_dir, split)]
    row_index, region_index = pick_film(FilmReader(str(root / "hub")), rows)
    row = rows[row_index]
    row["image"].save(root / "film.png")
    port = free_port()
    process = start_app(root / "hub", port, FINDINGS, root / "app.log")
    driver = chromium()
    try:
        yield {"root": root, "row": row, "region": row["regions"][region_index], "url": f"http://127.0.0.1:{port}",
               "driver": driver}
    finally:
        driver.quit()
        stop_app(process)


def test_a_box_drawn_over_a_lesion_is_named_and_the_film_gets_its_findings_and_heatmap(app, tmp_path):
    page = AppPage(app["driver"], app["url"] + "/")
    root, row, region = app["root"], app["row"], app["region"]

    # bad uploads first: each is a message in the page, the field is cleared, and the app goes on serving
    (root / "empty.png").write_bytes(b"")
    assert "empty.png is empty (0 bytes)" in page.upload(root / "empty.png", "Cannot analyse")
    (root / "report.txt").write_text("Nodule in the left upper zone.")
    assert "report.txt is not a film the model can read" in page.upload(root / "report.txt", "not a film")
    assert "Traceback" not in app["driver"].page_source

    width, height = row["image"].size
    assert f"Loaded a {width} x {height} film" in page.upload(root / "film.png", "Loaded")
    time.sleep(1)  # the canvas draws the film after the message
    page.draw_box(region["bbox"], width, height)
    page.analyse(expect="Box 1")
    summary = page.text("summary")
    assert page.text("message") == "", page.text("message")

    # the box's top finding is its lesion's type; the box-free top finding is one of the film's findings
    assert f"Box 1: {region['label']} (p = " in summary, summary
    box_free_top = summary.split("Box-free top finding: ")[1].split(" (p")[0]
    assert box_free_top in [other["label"] for other in row["regions"]], (box_free_top, row["regions"])
    # the box reached the model where it was drawn
    (number, xyxy, top_finding, *_), = page.table("box-results")
    drawn = [float(value) for value in xyxy.split(",")]
    assert max(abs(a - b) for a, b in zip(drawn, region["bbox"], strict=True)) <= BOX_TOLERANCE, (drawn, region)
    assert (number, top_finding) == ("1", region["label"])
    # the heatmap of the box-free top finding is shown
    heatmap = app["driver"].find_element("css selector", "#heatmap img")
    assert app["driver"].execute_script("return arguments[0].naturalWidth", heatmap) > 0
    selected = app["driver"].find_element("css selector", "#heatmap-finding input").get_attribute("value")
    assert selected == box_free_top

    # offline: every request of the page went to the app itself
    outside = [url for url in page.resources() if not url.startswith((app["url"], "data:", "blob:"))]
    assert outside == [], outside

    app["driver"].save_screenshot(str(tmp_path / "app.png"))
    if os.environ.get("REGIONMED_SCREENSHOTS"):  # e.g. docs/figures, to refresh the README's picture
        shutil.copy(tmp_path / "app.png", os.path.join(os.environ["REGIONMED_SCREENSHOTS"], "app.png"))
