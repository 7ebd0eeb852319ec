"""CheXpert: train.csv / valid.csv / test.csv (or their folder), images `Path`, as written or without its first
folder. Its labeler classes and values, and the labels-only draft, serve MIMIC-CXR too (`mimic_cxr`)."""

from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

from .captions import CXR, _modality_name
from .inputs import _grouped, _read_csv
from .rows import SkipCounter, _converter, _Draft, _listed_once
from .splits import _split_from_path

__all__ = ["_CHEXPERT_CLASSES", "_chexpert", "_chexpert_labels", "_labelled_draft"]

# The 14 classes of the CheXpert labeler, as CheXpert's and MIMIC-CXR-JPG's label files name their columns.
_CHEXPERT_CLASSES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
# Labeler values: 1 positive, 0 negative, -1 uncertain, blank not mentioned (read as negative). The releases write
# floats; other exports (pandas integer columns) write integers.
_CHEXPERT_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "": 0, "-1.0": -1, "-1": -1}
_CHEXPERT_FILES = ("train.csv", "valid.csv", "test.csv")


def _chexpert_labels(row: dict[str, str]) -> tuple[list[str], list[str]]:
    """(positive classes, uncertain classes) of a labeler row; ValueError naming the column for any other value."""
    positive, uncertain = [], []
    for name in _CHEXPERT_CLASSES:
        value = _CHEXPERT_VALUES.get(row[name])
        if value is None:
            raise ValueError(f"unknown label value {name}={row[name]!r}")
        if value == 1:
            positive.append(name)
        elif value == -1:
            uncertain.append(name)
    return positive, uncertain


def _labelled_draft(image_id: str, candidates: list[Path], split: str, labels: tuple[list[str], list[str]]) -> _Draft:
    """A chest X-ray known only by its labeler classes; captions name the positive ones, never the uncertain ones."""
    positive, uncertain = labels
    return _Draft(
        image_id,
        candidates,
        split=split,
        labels=positive,
        uncertain_labels=uncertain,
        # Nothing positive (only uncertain or unmentioned classes) is not "no finding": the caption claims nothing.
        summary=None if positive else f"{_modality_name(CXR)}.",
    )


@_converter
def _chexpert(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, frontal_only: bool = False
) -> Iterator[_Draft]:
    """CheXpert train.csv / valid.csv / test.csv (or their folder): one row per image, split from the file name.

    `Path` ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg") is looked for in `images_dir` as
    written, then without its first folder (`images_dir` = the CheXpert-v1.0-small folder itself). A label value
    other than 1 / 0 / -1 / blank skips the row; `frontal_only` skips lateral views; a `Path` listed again is a
    duplicate (identical rows: the first kept) or, when the rows disagree, left out (all counted).
    """
    files = [input_path / name for name in _CHEXPERT_FILES] if input_path.is_dir() else [input_path]
    required = ("Path", *_CHEXPERT_CLASSES, *(["Frontal/Lateral"] if frontal_only else []))

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for path in filter(Path.is_file, files):
            split = _split_from_path(path)
            for row in _read_csv(path, required, skipped):
                yield row["Path"], {"split": split, "row": dict(row), "where": f"{path}, line {row.line}"}

    for image_id, group in _grouped(records(), skipped):
        record = _listed_once(group, "image (Path)", image_id, skipped.skip_row, same=itemgetter("split", "row"))
        if record is None:
            continue
        row = record["row"]
        if frontal_only and row["Frontal/Lateral"] != "Frontal":
            skipped.skip_row("not a frontal view", image_id)
            continue
        try:
            labels = _chexpert_labels(row)
        except ValueError as error:
            skipped.skip_row(str(error), image_id)
            continue
        relative = Path(image_id)
        candidates = [images_dir / relative]
        if len(relative.parts) > 1:
            candidates.append(images_dir.joinpath(*relative.parts[1:]))
        yield _labelled_draft(image_id, candidates, record["split"], labels)
