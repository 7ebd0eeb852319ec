"""The bad-input corpus (tests/corpus/generate.py), layer by layer: each input is either a clear error
(its type, a message naming the file, field or value) or a documented repair (and its result)."""

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from corpus.generate import CASES, FILM_SIZE, LAYERS, Case, Error, Repair, generate
from PIL import Image

from regionmed_clip.processing import (
    RegionMedCLIPImageProcessor,
    RegionMedCLIPProcessor,
    build_tokenizer,
    load_medical_image,
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("corpus"))


def layer_cases(layer: str) -> list[Any]:
    return [pytest.param(case, id=case.name) for case in CASES if case.layer == layer]


def check(case: Case, run: Any, caplog: pytest.LogCaptureFixture | None = None) -> None:
    """`run()` raises the case's error, or returns what its repair check accepts (and logs the warning
    the repair `warns` of: pass `caplog` for a layer that has such repairs)."""
    if isinstance(case.expect, Error):
        with pytest.raises(case.expect.type, match=case.expect.match):
            run()
        return
    if case.expect.warns is None:
        case.expect.check(run())
        return
    assert caplog is not None, f"{case.layer} layer: pass caplog to check its repairs' warnings"
    with caplog.at_level(logging.WARNING):
        case.expect.check(run())
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any(re.search(case.expect.warns, message) for message in warnings), warnings


def test_every_layer_has_errors_or_repairs_and_the_manifest_lists_each_case(corpus):
    assert {case.layer for case in CASES} == set(LAYERS)
    names = [f"{case.layer}/{case.name}" for case in CASES]
    assert len(set(names)) == len(names)
    manifest = json.loads((next(iter(corpus.values())).parents[1] / "manifest.json").read_text())
    assert [f"{entry['layer']}/{entry['name']}" for entry in manifest] == names
    assert {entry["outcome"] for entry in manifest} == {"error", "repair"}
    assert [entry.get("warns") for entry in manifest] == [
        case.expect.warns if isinstance(case.expect, Repair) else None for case in CASES]


@pytest.mark.parametrize("case", layer_cases("image"))
def test_image_layer(corpus, case):
    check(case, lambda: load_medical_image(corpus[f"image/{case.name}"]))


@pytest.mark.parametrize("case", layer_cases("dicom"))
def test_dicom_layer(corpus, case, caplog):
    pytest.importorskip("pydicom")
    check(case, lambda: load_medical_image(str(corpus[f"dicom/{case.name}"])), caplog)


@pytest.mark.parametrize("case", layer_cases("regions"))
def test_regions_layer(corpus, case, caplog):
    path = corpus[f"regions/{case.name}"]
    spec = np.load(path) if path.suffix == ".npy" else json.loads(path.read_text())
    regions = spec if case.name.startswith("nine") else [spec]
    film = np.add.outer(np.arange(FILM_SIZE[1]), np.arange(FILM_SIZE[0])).astype(np.uint8)
    processor = RegionMedCLIPImageProcessor(image_size=64, roi_size=16, max_rois=8)
    check(case, lambda: processor(film, regions=[regions]), caplog)


@pytest.mark.parametrize("case", layer_cases("processor"))
def test_processor_layer(corpus, case):
    path = corpus[f"processor/{case.name}"]
    arguments = json.loads(path.read_text())
    tokenizer = build_tokenizer(["a nodule in the right upper zone"], vocab_size=64)
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(image_size=32, roi_size=16), tokenizer)
    with contextlib.ExitStack() as files:
        if "images" in arguments:
            arguments["images"] = [files.enter_context(Image.open(path.parent / name)) for name in arguments["images"]]
        check(case, lambda: processor(**arguments))


@pytest.mark.parametrize("case", layer_cases("tokenizer"))
def test_tokenizer_layer(corpus, case):
    from regionmed_clip.processing import load_tokenizer

    check(case, lambda: load_tokenizer(corpus[f"tokenizer/{case.name}"]))


@pytest.mark.parametrize("case", layer_cases("dataset"))
def test_dataset_layer(corpus, case, caplog):
    from regionmed_clip.data.schema import load_canonical

    check(case, lambda: list(load_canonical(corpus[f"dataset/{case.name}"], "train", decode_images=False)), caplog)


@pytest.mark.parametrize("case", layer_cases("writer"))
def test_writer_layer(corpus, case, tmp_path):
    from corpus.generate import _canonical_row

    from regionmed_clip.data.schema import write_rows

    row = _canonical_row(corpus[f"writer/{case.name}"].read_bytes())
    check(case, lambda: write_rows([row], tmp_path / "out"))


@pytest.fixture(scope="module")
def collator():
    from regionmed_clip.training_scripts.collator import RegionMedCLIPCollator

    tokenizer = build_tokenizer(["a nodule in the right upper zone", "chest x-ray with nodule"], vocab_size=120)
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(image_size=64, roi_size=16, max_rois=4), tokenizer)
    return RegionMedCLIPCollator(processor, seed=0, windows_per_image=0)  # the rows' own regions only


@pytest.mark.parametrize("case", layer_cases("rows"))
def test_rows_layer(corpus, case, collator):
    def row(path: Path) -> dict[str, Any]:
        fields = json.loads(path.read_text())
        return {**fields, "image": {"bytes": (path.parent / fields["image"]).read_bytes(), "path": None}}

    good = row(corpus["rows/null-report.json"]) | {"image_id": "film-0", "report_caption": "A nodule."}
    check(case, lambda: collator([good, row(corpus[f"rows/{case.name}"])]))


@pytest.mark.parametrize("case", layer_cases("checkpoints"))
def test_checkpoints_layer(corpus, case, caplog):
    from regionmed_clip.training_scripts.checkpoints import latest_intact_checkpoint

    def resume_from() -> tuple[Path | None, str]:
        with caplog.at_level(logging.WARNING, logger="regionmed_clip.training_scripts.checkpoints"):
            return latest_intact_checkpoint(corpus[f"checkpoints/{case.name}"]), caplog.text

    check(case, resume_from)


@pytest.mark.parametrize("case", layer_cases("converters"))
def test_converters_layer(corpus, case, tmp_path):
    from converter_helpers import run

    out = tmp_path / "out"
    check(case, lambda: run(case.name.split(".")[0], corpus[f"converters/{case.name}"], None, out))
    if isinstance(case.expect, Error):
        assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial dataset left behind


@pytest.fixture(scope="module")
def model():
    from conftest import tiny_model

    return tiny_model()


@pytest.mark.parametrize("case", layer_cases("model"))
def test_model_layer(corpus, case, model):
    image, roi = model.config.vision_config.image_size, model.config.roi_image_size
    boxes = torch.tensor(json.loads(corpus[f"model/{case.name}"].read_text()), dtype=torch.float32)
    inputs = {"pixel_values": torch.zeros(1, 3, image, image), "roi_pixel_values": torch.zeros(1, 1, 3, roi, roi),
              "roi_boxes": boxes, "roi_mask": torch.ones(1, 1, dtype=torch.long)}
    check(case, lambda: model.get_image_features(**inputs))
