"""MIMIC-CXR-JPG: mimic-cxr-2.0.0-chexpert.csv or -negbio.csv (+ -metadata.csv, optionally -split.csv, beside it;
each may be .csv.gz), images `files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`."""

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .chexpert import _CHEXPERT_CLASSES, _chexpert_labels, _labelled_draft
from .inputs import _grouped, _read_csv
from .rows import SkipCounter, _converter, _Draft, _listed_once
from .splits import _split_name

__all__ = ["_mimic_cxr"]

_MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
_MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
_MIMIC_FRONTAL = frozenset({"PA", "AP"})  # ViewPosition values of frontal films


def _beside(path: Path, name: str) -> Path | None:
    """`name` or `name.gz` (as PhysioNet ships it) in the folder of `path`; None when neither is there."""
    return next((file for file in (path.parent / name, path.parent / f"{name}.gz") if file.is_file()), None)


@_converter
def _mimic_cxr(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, frontal_only: bool = False
) -> Iterator[_Draft]:
    """MIMIC-CXR-JPG: labels per study from mimic-cxr-2.0.0-chexpert.csv or -negbio.csv (the input), given to every
    image of the study in mimic-cxr-2.0.0-metadata.csv (required beside the input), stored at
    `files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`; image id = dicom_id. Split per image from
    mimic-cxr-2.0.0-split.csv when it is beside the input ("validate" -> validation), else "train". Each file may
    also be `.csv.gz`.

    Counted skips, once per study: an unknown label value, label rows that disagree (identical ones are
    duplicates, the first kept), no image in the metadata; once per image: its study has no label row, it is not in
    the split file, it is listed twice in the metadata or the split file with different values, or (`frontal_only`)
    its ViewPosition is not PA / AP.
    """
    metadata = _beside(input_path, _MIMIC_METADATA)
    if metadata is None:
        raise FileNotFoundError(f"{_MIMIC_METADATA} (or .gz) must be beside {str(input_path)!r}")
    split_file = _beside(input_path, _MIMIC_SPLIT)

    def label_records() -> Iterator[tuple[str, dict[str, Any]]]:
        for row in _read_csv(input_path, ("study_id", *_CHEXPERT_CLASSES), skipped):
            try:
                positive, uncertain = _chexpert_labels(row)
            except ValueError as error:
                yield row["study_id"], {"kind": "labels", "invalid": str(error)}
                continue
            yield row["study_id"], {"kind": "labels", "invalid": None, "positive": positive, "uncertain": uncertain}

    image_records = (
        (row["study_id"], {"kind": "image", **{key: row[key] for key in ("dicom_id", "subject_id", "ViewPosition")}})
        for row in _read_csv(metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition"), skipped)
    )
    split_records = (
        (row["study_id"], {"kind": "split", "dicom_id": row["dicom_id"], "split": row["split"]})
        for row in (_read_csv(split_file, ("dicom_id", "study_id", "split"), skipped) if split_file is not None else ())
    )
    for study_id, group in _grouped(itertools.chain(label_records(), image_records, split_records), skipped):
        label_rows = [record for record in group if record["kind"] == "labels"]
        study_images = _by_key(record for record in group if record["kind"] == "image")
        image_splits = _by_key(record for record in group if record["kind"] == "split")
        if not label_rows:
            for dicom_id in study_images:
                skipped.skip_row("image of a study without labels", dicom_id)
            continue
        study = _listed_once(label_rows, "study (label row)", study_id, skipped.skip_row)
        if study is None:
            continue
        if study["invalid"] or not study_images:
            skipped.skip_row(study["invalid"] or "study without images in the metadata", study_id)
            continue
        for dicom_id, listed in study_images.items():
            image = _listed_once(listed, "image (dicom_id) in the metadata", dicom_id, skipped.skip_row)
            if image is None:
                continue
            subject_id = image["subject_id"]
            if frontal_only and image["ViewPosition"] not in _MIMIC_FRONTAL:
                skipped.skip_row("not a frontal view", dicom_id)
                continue
            if split_file is not None and dicom_id not in image_splits:
                skipped.skip_row("image not in the split file", dicom_id)
                continue
            if split_file is not None:
                listed_split = _listed_once(image_splits[dicom_id], "image (dicom_id) in the split file", dicom_id,
                                            skipped.skip_row)
                if listed_split is None:
                    continue
            folder = images_dir / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"
            split = _split_name(listed_split["split"] if split_file is not None else "train")
            labels = (study["positive"], study["uncertain"])
            yield _labelled_draft(dicom_id, [folder / f"{dicom_id}.jpg"], split, labels)


def _by_key(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records by their dicom_id, in input order."""
    listed: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        listed.setdefault(record["dicom_id"], []).append(record)
    return listed
