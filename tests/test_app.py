"""Behaviour of `regionmed-app` without a browser: what it reads (films, findings, boxes), what it answers (the
model's own region and box-free scores, through its public API), and the Space that `regionmed-export --space`
writes and `regionmed-push --space --dry-run` checks. tests/test_app_browser.py drives the page itself."""

import ast

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import run_failing
from PIL import Image

from regionmed_clip.apps.app import (
    AppInputError,
    FilmReader,
    canvas_picture,
    default_findings,
    display_scale,
    main,
    parse_boxes,
    parse_findings,
    read_film,
)
from regionmed_clip.apps.export import export_model
from regionmed_clip.apps.push import push_folder
from regionmed_clip.apps.space import PACKAGE, SpaceFolderError, check_space_folder
from regionmed_clip.cli import UsageError
from regionmed_clip.data.schema import load_canonical

from conftest import build_saved_model

FINDINGS = ["nodule", "mass", "effusion"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untrained tiny model exported as a Hub folder with its Space, and its synthetic data."""
    root = tmp_path_factory.mktemp("app")
    model_dir, data_dir, _, _ = build_saved_model(root)
    export_model(model_dir, root / "hub", repo_id="org/regionmed-tiny", space_dir=root / "space")
    return root / "hub", root / "space", data_dir


@pytest.fixture(scope="module")
def reader(exported):
    return FilmReader(str(exported[0]))


# -- input --------------------------------------------------------------------------------------------------


def test_findings_are_split_on_commas_and_lines_kept_in_order_once():
    assert parse_findings(" nodule, mass\nnodule ,,effusion ") == ["nodule", "mass", "effusion"]
    for text in ("", " , ", "nodule"):
        with pytest.raises(AppInputError, match="at least two findings"):
            parse_findings(text)


def test_default_findings_are_the_prompt_files_classes(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump({"default": {"positive": ["{c}."], "negative": ["No {c}."]},
                                    "classes": {"Nodule": {"positive": ["A nodule."]}, "Mass": {}}}, sort_keys=False))
    assert default_findings(path) == ["Nodule", "Mass"]
    assert "Pneumothorax" in default_findings()  # the shipped chest X-ray file


def test_drawn_boxes_become_film_pixels_and_a_bad_box_is_named():
    drawn = {"boxes": [{"xmin": 10, "ymin": 20, "xmax": 50.5, "ymax": 60, "label": "", "color": [255, 0, 0]},
                       {"xmin": 0, "ymin": 0, "xmax": 200, "ymax": 100}]}
    assert parse_boxes(drawn, 200, 100, 4) == [[10, 20, 50.5, 60], [0, 0, 200, 100]]
    assert parse_boxes(None, 200, 100, 4) == [] and parse_boxes({"image": None, "boxes": []}, 200, 100, 4) == []
    outside = {"boxes": [drawn["boxes"][0], {"xmin": 150, "ymin": 20, "xmax": 230, "ymax": 60}]}
    with pytest.raises(AppInputError, match=r"box 2 \(x 150\.\.230, y 20\.\.60\) lies outside the 200 x 100 film"):
        parse_boxes(outside, 200, 100, 4)
    with pytest.raises(AppInputError, match="box 1 .* is empty"):
        parse_boxes({"boxes": [{"xmin": 30, "ymin": 20, "xmax": 30, "ymax": 60}]}, 200, 100, 4)
    with pytest.raises(AppInputError, match="5 boxes drawn; the model reads at most 4"):
        parse_boxes({"boxes": [drawn["boxes"][0]] * 5}, 200, 100, 4)


def test_a_large_film_goes_to_the_canvas_as_a_smaller_copy_and_its_boxes_come_back_in_film_pixels():
    film = Image.new("L", (3000, 2400), 80)
    assert display_scale(*film.size) == pytest.approx(1024 / 3000)
    assert canvas_picture(film).shape == (819, 1024, 3)
    assert canvas_picture(Image.new("L", (256, 200))).shape == (200, 256, 3)  # small films as they are
    scale = display_scale(3000, 2400)
    drawn = {"boxes": [{"xmin": 102.4, "ymin": 51.2, "xmax": 204.8, "ymax": 819 * 1.0}]}
    assert parse_boxes(drawn, 3000, 2400, 4, scale)[0] == pytest.approx([300.0, 150.0, 600.0, 2399.4140625])
    with pytest.raises(AppInputError, match="lies outside the 3000 x 2400 film"):
        parse_boxes({"boxes": [{"xmin": 0, "ymin": 0, "xmax": 1030, "ymax": 10}]}, 3000, 2400, 4, scale)


def test_a_film_is_read_as_the_processor_reads_it_and_a_bad_file_is_named(tmp_path):
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)  # 16-bit, 0 .. 61420
    Image.fromarray(ramp).save(tmp_path / "film16.tiff")
    film = read_film(tmp_path / "film16.tiff")
    assert film.mode == "L" and film.size == (64, 48)
    pixels = np.asarray(film)
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255 and np.all(np.diff(pixels.ravel().astype(int)) >= 0)

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(AppInputError, match=r"empty\.png is empty \(0 bytes\)"):
        read_film(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_text("a report, not a film")
    with pytest.raises(AppInputError, match=r"notes\.txt is not a film the model can read"):
        read_film(tmp_path / "notes.txt")


def _dicom(path, pixels=None) -> None:
    """A secondary-capture DICOM file, with 16-bit MONOCHROME2 `pixels` or none."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    dataset = pydicom.Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID, dataset.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    dataset.PatientName = "Anonymous"
    if pixels is not None:
        dataset.set_pixel_data(pixels, "MONOCHROME2", 16)
    dataset.save_as(path, enforce_file_format=True)


def test_a_dicom_film_is_read_and_one_without_pixels_is_named(tmp_path):
    _dicom(tmp_path / "film.dcm", np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    film = read_film(tmp_path / "film.dcm")
    assert film.mode == "L" and film.size == (2, 2)
    assert np.asarray(film).tolist() == [[0, 64], [128, 255]]  # min-max over 0..4000, as the processor reads it
    _dicom(tmp_path / "no_pixels.dcm")
    with pytest.raises(AppInputError, match=r"no_pixels\.dcm is not a film the model can read: .*[Pp]ixel"):
        read_film(tmp_path / "no_pixels.dcm")


# -- what it answers ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_a_box_is_scored_by_the_models_region_embedding_and_named_by_its_nearest_region_caption(exported, reader):
    _, _, data_dir = exported
    row = load_canonical(data_dir, "test")[0]
    film, boxes = row["image"], [region["bbox"] for region in row["regions"]][:2]
    analysis = reader.analyse(film, FINDINGS, boxes)

    # the oracle: the model's own forward on the processor's inputs, as the model card shows it
    model, processor = reader.model, reader.processor
    captions = reader.region_captions(FINDINGS)
    assert len(captions) == 2 * 3 * len(FINDINGS) and "mass in the left upper zone" in captions
    def region_probabilities(texts: list[str], template: str) -> torch.Tensor:
        inputs = processor(images=[film], regions=[boxes], text=[template.format(text) for text in texts],
                           return_tensors="pt")
        out = model(**inputs)
        return (out.logit_scale * out.region_embeds[0][: len(boxes)] @ out.text_embeds.t()).softmax(-1)

    for reading, expected in zip(analysis.boxes, region_probabilities(FINDINGS, "There is a {}."), strict=True):
        assert dict(reading.scores) == pytest.approx(dict(zip(FINDINGS, expected.tolist(), strict=True)), abs=1e-5)
        assert reading.scores[0][0] == FINDINGS[int(expected.argmax())]
    for reading, expected in zip(analysis.boxes, region_probabilities(captions, "{}"), strict=True):
        assert reading.caption == captions[int(expected.argmax())]
        assert reading.caption_score == pytest.approx(float(expected.max()), abs=1e-5)
    assert [reading.box for reading in analysis.boxes] == boxes

    # a box elsewhere is another region: its scores move
    moved = [[box[0] + 60, box[1], box[2] + 60, box[3]] for box in boxes]
    elsewhere = reader.analyse(film, FINDINGS, moved)
    assert dict(elsewhere.boxes[0].scores) != pytest.approx(dict(analysis.boxes[0].scores), abs=1e-4)


@torch.no_grad()
def test_the_box_free_reading_is_the_pipelines_with_a_heatmap_whose_peak_is_the_best_region(exported, reader):
    _, _, data_dir = exported
    film = load_canonical(data_dir, "test")[1]["image"]
    analysis = reader.analyse(film, FINDINGS)
    assert analysis.boxes == []
    assert sum(entry["score"] for entry in analysis.findings) == pytest.approx(1.0, abs=1e-5)
    assert [entry["score"] for entry in analysis.findings] == sorted((e["score"] for e in analysis.findings), reverse=True)
    for entry in analysis.findings:
        x0, y0, x1, y1 = entry["box"]
        heat = entry["heatmap"]  # film-sized here (256 px <= 512)
        assert heat.shape == (film.height, film.width)
        peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
        assert heat[int((y0 + y1) / 2), int((x0 + x1) / 2)] == pytest.approx(heat.max(), rel=0.35)
        assert 0 <= peak_x < film.width and 0 <= peak_y < film.height
    picture = reader.heatmap_picture(film, analysis, analysis.findings[-1]["label"])
    assert picture.width == film.width and picture.height > film.height  # the film, with its title line


# -- the command --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "names"), [
    (["--model", "org/m", "--port", "0"], ["--port"]),
    (["--model", "org/m", "--findings", "nodule"], ["at least two names", "--findings"]),
    (["--model", "org/m", "--template", "There is a finding."], ["--template", "{}"]),
    (["--model", "org/m", "--region-template", "{side} {zone}"], ["--region-template", "{finding}"]),
])
def test_bad_arguments_are_one_line_naming_them(argv, names, capsys):
    run_failing(main, argv, capsys, 2, *names)


def test_a_model_that_is_no_folder_nor_repo_id_is_one_line_naming_it(tmp_path, capsys):
    run_failing(main, ["--model", str(tmp_path / "absent")], capsys, 2, "--model", "absent", "neither a folder")
    run_failing(main, ["--model", str(tmp_path)], capsys, 2, "--model", "no config.json")


# -- the Space ----------------------------------------------------------------------------------------------


def test_export_writes_a_space_that_calls_the_app_on_the_model_repo(exported):
    _, space, _ = exported
    summary = check_space_folder(space)
    assert summary["files"] == ["README.md", "app.py", "requirements.txt"] and summary["models"] == ["org/regionmed-tiny"]
    header = yaml.safe_load((space / "README.md").read_text().split("---\n")[1])
    import gradio

    assert {key: header[key] for key in ("sdk", "sdk_version", "app_file", "license", "models")} == {
        "sdk": "gradio", "sdk_version": gradio.__version__, "app_file": "app.py", "license": "apache-2.0",
        "models": ["org/regionmed-tiny"]}
    assert "not-for-clinical-use" in header["tags"] and "Not for clinical use" in (space / "README.md").read_text()
    calls = [node for node in ast.walk(ast.parse((space / "app.py").read_text())) if isinstance(node, ast.Call)]
    assert [(call.func.id, call.args[0].value) for call in calls] == [("launch", "org/regionmed-tiny")]
    from importlib.metadata import version

    assert (space / "requirements.txt").read_text() == f"{PACKAGE}[app]=={version(PACKAGE)}\n"
    assert push_folder(space, "org/regionmed-tiny-demo", dry_run=True, space=True)["models"] == ["org/regionmed-tiny"]


def test_a_space_needs_the_model_repo_and_a_new_folder(exported, tmp_path):
    hub, space, _ = exported
    model_dir = build_saved_model(tmp_path / "saved")[0]
    with pytest.raises(UsageError, match="--space needs --repo-id"):
        export_model(model_dir, tmp_path / "hub", space_dir=tmp_path / "space")
    with pytest.raises(UsageError, match="--space .* is not empty"):
        export_model(model_dir, tmp_path / "hub", repo_id="org/x", space_dir=space)
    assert not (tmp_path / "hub").exists()  # nothing written when an argument is wrong


def test_push_checks_a_space_folder_and_names_what_is_wrong(exported, tmp_path):
    hub, space, _ = exported
    with pytest.raises(SpaceFolderError, match=r"lacks \['app.py', 'requirements.txt'\]"):
        push_folder(hub, "org/demo", dry_run=True, space=True)  # a model folder is no Space
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("README.md", "app.py", "requirements.txt"):
        (broken / name).write_text((space / name).read_text())
    (broken / "app.py").write_text("from regionmed_clip.apps.app import launch\n\nlaunch('org/other')\n")
    with pytest.raises(SpaceFolderError, match=r"does not load the model\(s\) \['org/regionmed-tiny'\]"):
        check_space_folder(broken)
    (broken / "app.py").write_text((space / "app.py").read_text())
    (broken / "README.md").write_text((space / "README.md").read_text().replace("sdk: gradio\n", ""))
    with pytest.raises(SpaceFolderError, match=r"lacks \['sdk'\]"):
        check_space_folder(broken)
