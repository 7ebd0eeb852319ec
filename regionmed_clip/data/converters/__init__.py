"""Convert public medical-image annotation formats into the canonical region-annotated schema.

Formats (keys of `CONVERTERS`; layouts as in the datasets' public releases):

    ms-cxr          MS_CXR_Local_Alignment_v1.x.0.csv, images at `images_dir / path`
    vindr-cxr       VinBigData train.csv, images `{image_id}.dicom|.dcm|.png|.jpg|.jpeg`
    rsna-pneumonia  stage_2_train_labels.csv (+ stage_2_detailed_class_info.csv beside it), images `{patientId}.dcm`
    chestxray14     BBox_List_2017.csv, images `Image Index`
    chexpert        train.csv / valid.csv / test.csv (or their folder), images `Path`, as written or without its
                    first folder
    mimic-cxr       mimic-cxr-2.0.0-chexpert.csv or -negbio.csv (+ -metadata.csv, optionally -split.csv, beside it;
                    each may be .csv.gz), images `files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`
    siim-acr        train-rle.csv, images `{ImageId}.dcm|.png`
    slake           train.json / validate.json / test.json (or their folder), images `imgs/{img_name}`
    vqa-rad         VQA_RAD Dataset Public.json (or its folder), images `{image_name}` in `VQA_RAD Image Folder/`
    roco            captions.txt (or a folder searched for captions.txt), dlinks.txt beside it; images
                    `{PMCid}_{name}|{name}|{ROCO_xxxxx}.jpg|.png` in `images/` beside captions.txt
    coco            a COCO detection JSON, images `file_name`

`images_dir` defaults to the input's folder (the input itself when it is a folder); for ROCO, to each
captions.txt's `images/` folder; for VQA-RAD, to `VQA_RAD Image Folder` beside the JSON.

Streaming: CSV and text files are read row by row. Formats with several annotation rows per image are grouped
by spilling the parsed annotations into a temporary on-disk sqlite database read back `ORDER BY image_id`, so
memory holds one image's annotations (plus the writer's one shard), whatever the dataset size. JSON formats
(SLAKE, VQA-RAD, COCO) are single documents and are loaded whole, then grouped the same way.

VQA formats (SLAKE, VQA-RAD) also write their questions, with `vqa_dir`, to `vqa_dir/{split}.json`: a JSON list of
VQA-RAD-style records `{qid, image_name, question, answer, answer_type, question_type, phrase_type, image_organ}`
whose `image_name` is the `image_id` of the canonical row of that split the question is about
(`regionmed_clip.data.vqa` reads them back).

A bad row never raises and never ends a run (a file that cannot be read as its format does: an error naming
the file, line or entry); everything left out is counted in a `SkipCounter`:

* a whole ROW is skipped for a missing or undecodable image, an image path outside the images folder (absolute or
  with `..`; never opened), a CSV row whose fields do not match the header, a duplicate (an identical repeat of
  what a source lists once: the first is kept) or repeats that disagree (none kept; `rows._listed_once`), an
  annotation without an image id, a malformed ROCO line, COCO annotations of an unknown image id, a CheXpert label value other than 1 / 0 / -1 / blank (the
  reason names the column and value), a MIMIC-CXR study without images or image without labels, a lateral view
  with `frontal_only`, or a row failing `validate_row` (e.g. an unknown split);
* a single REGION is dropped (the row is kept, with its labels) for missing or unparsable coordinates, a
  zero-area or inverted box, a box wholly outside the image, an invalid or empty SIIM RLE mask, a COCO
  category that is not declared, or a malformed SLAKE detection.json entry;
* a single QUESTION (VQA formats) is left out of the VQA records when its image's row was skipped (the reason
  names the image) or, VQA-RAD, when it has no qid, image_name, question text or answer, or an answer_type other
  than OPEN / CLOSED, or shares its qid with another question (the shared duplicate rule).

Boxes end up as [x0, y0, x1, y1] pixels of the STORED image: DICOMs become 8-bit PNGs of the same size
(`load_medical_image`, windowed), other files are embedded as their own bytes; boxes are rescaled when a format
declares the annotated image size (MS-CXR `image_width/height`, COCO `width/height`) and it differs from the
file, then clipped to the image. An image with an EXIF orientation is stored upright (PNG, the tag gone), its
boxes as drawn on the image viewers show (or turned with it where the declared size is the file's own).

Caption templates (the dataset's own text wins where there is one):

* summary: "{Modality} with {findings}." ("Chest X-ray with pleural effusion and nodule/mass.",
  "Chest X-ray with no finding."); CheXpert / MIMIC-CXR the positive classes only (uncertain ones are in
  `uncertain_labels`, never in a caption), "Chest X-ray." when none is positive; ROCO: the caption's first
  sentence; SLAKE and VQA-RAD: "{Modality} of the {location}." (VQA-RAD: "Radiology image of the chest.");
* report: MS-CXR the `label_text` phrases as sentences; ROCO the caption; SLAKE "The liver, the spleen and the left
  kidney are seen." (the detection.json organs, else "The {location} is seen."); VQA-RAD "The {organ} is seen.";
  otherwise the region captions as sentences, "No abnormality is seen." for a no-finding image, or the summary;
* region caption: MS-CXR `label_text`; chest X-rays "{finding} in the {right|left} {upper|middle|lower} zone"
  (patient's side: the image's left half is the patient's right; zones are thirds of the image height);
  other modalities "{label} in the {upper|middle|lower} {left|centre|right} of the image";
* negative_captions: `make_hard_negatives(report, num=3, seed=seed)`; it may give fewer than 3, or none for a
  dataset text no rule applies to (a ROCO caption such as "Axial MRI of the brain.").

The package: the shared machinery is in `rows` (`SkipCounter`, `ConversionStats`, the `_Draft` of one image and
`_converter`, the shared steps from a draft to a validated row), `captions` (the caption templates), `splits`
(split names), `inputs` (CSV / JSON reading and the sqlite grouping), `geometry` (`_Box`, coordinate parsing,
box fusion, RLE masks) and `vqa_records` (the VQA record writers); each format is a module of its own (`ms_cxr`,
`vindr_cxr`, `rsna_pneumonia`, `chestxray14`, `chexpert`, `mimic_cxr`, `siim_acr`, `slake`, `vqa_rad`, `roco`,
`coco`) whose converter `CONVERTERS` registers. Names with a leading underscore are internal to the package; each
module's `__all__` lists what the other modules import from it.
"""

import collections
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from regionmed_clip.cli import UsageError
from regionmed_clip.data.schema import ShardedParquetWriter, dataset_output, write_provenance

from .chestxray14 import _chestxray14
from .chexpert import _chexpert
from .coco import _coco
from .mimic_cxr import _mimic_cxr
from .ms_cxr import _ms_cxr
from .roco import _roco
from .rows import ConversionStats, SkipCounter
from .rsna_pneumonia import _rsna_pneumonia
from .siim_acr import _siim_acr
from .slake import _slake
from .vindr_cxr import _vindr_cxr
from .vqa_rad import VQA_RAD_VALIDATION_FRACTION, _vqa_rad

__all__ = ["CONVERTERS", "VQA_RAD_VALIDATION_FRACTION", "ConversionStats", "SkipCounter", "check_options", "convert",
           "iter_rows"]

logger = logging.getLogger(__name__)

_INTERNAL_OPTIONS = frozenset({"skipped", "given_images", "forced_split"})  # passed by the formats themselves
_VQA_FORMATS = frozenset({"slake", "vqa-rad"})  # formats that also write `vqa/{split}.json`

CONVERTERS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "ms-cxr": _ms_cxr,
    "vindr-cxr": _vindr_cxr,
    "rsna-pneumonia": _rsna_pneumonia,
    "chestxray14": _chestxray14,
    "chexpert": _chexpert,
    "mimic-cxr": _mimic_cxr,
    "siim-acr": _siim_acr,
    "slake": _slake,
    "vqa-rad": _vqa_rad,
    "roco": _roco,
    "coco": _coco,
}


def iter_rows(
    format: str,
    input_path: Path,
    images_dir: Path | None,
    *,
    seed: int = 0,
    skipped: SkipCounter,
    **options: Any,
) -> Iterator[dict[str, Any]]:
    """Stream the canonical rows of one dataset in `format` (a key of `CONVERTERS`).

    Every converter accepts `split=` (force one split for all rows); `coco` also `modality=` (default
    "unknown"), `slake` and `vqa-rad` also `vqa_dir=` (where `{split}.json` VQA records are written; none when
    omitted), `vqa-rad` also `validation_fraction=` (default `VQA_RAD_VALIDATION_FRACTION`), `chexpert` and
    `mimic-cxr` also `frontal_only=` (skip lateral views, counted; default False).
    Unknown formats and missing inputs raise at once; bad rows are counted in `skipped`.
    """
    if format not in CONVERTERS:
        raise ValueError(f"unknown format {format!r}; known formats: {sorted(CONVERTERS)}")
    input_path = Path(input_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input {str(input_path)!r} does not exist")
    images = Path(images_dir) if images_dir is not None else None
    check_options(format, options)
    return CONVERTERS[format](input_path, images, seed=seed, skipped=skipped, **options)


def check_options(format: str, options: dict[str, Any]) -> None:
    """A clear error for an option the format does not take (`--modality` with `ms-cxr`), instead of a
    TypeError from deep inside the generator (a format that forwards `**options` names where, `forwards_to`). A
    `UsageError`
    (a ValueError): on the command line it is a bad argument (exit 2)."""
    accepted: set[str] = set()
    converter: Any = CONVERTERS[format]
    while converter is not None:  # a format that forwards `**options` names the function it forwards them to
        parameters = inspect.signature(converter).parameters.values()
        accepted |= {parameter.name for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY}
        forwards = any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters)
        converter = getattr(converter, "forwards_to", None) if forwards else None
    accepted = (accepted - _INTERNAL_OPTIONS) | {"split"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UsageError(f"format {format!r} takes no option {unknown}; its options: {sorted(accepted)}")


def convert(
    format: str,
    input_path: str | Path,
    images_dir: str | Path | None,
    output_dir: str | Path,
    *,
    rows_per_shard: int = 1000,
    seed: int = 0,
    **options: Any,
) -> ConversionStats:
    """Convert one dataset into canonical parquet shards in `output_dir`; logs and returns the statistics.

    `options` go to the converter (see `iter_rows`). For `slake` (English only) and `vqa-rad`, VQA records go to
    `output_dir/vqa`.
    """
    output_dir = Path(output_dir)
    skipped = SkipCounter()
    start = time.perf_counter()
    with dataset_output(output_dir) as partial:  # a killed conversion leaves nothing that stays
        if format in _VQA_FORMATS:
            # The questions are a second output, written next to the shards as the synthetic set does.
            options["vqa_dir"] = partial / "vqa" if options.get("vqa_dir") in (None, output_dir / "vqa") else options["vqa_dir"]
        rows = iter_rows(format, Path(input_path), images_dir, seed=seed, skipped=skipped, **options)
        with ShardedParquetWriter(partial, rows_per_shard) as writer:
            for row in rows:
                writer.write(row)
        if not writer.counts:
            raise ValueError(f"{format}: no row could be converted from {input_path} (skipped {skipped.rows}: "
                             f"{skipped.describe() or 'no rows in the input'})")
        write_provenance(partial, format, real_patient_data=True, input=str(input_path),
                         images=None if images_dir is None else str(images_dir), rows=dict(writer.counts))
    stats = ConversionStats(
        rows_written=dict(writer.counts),
        rows_skipped=skipped.rows,
        skip_reasons=collections.Counter(skipped.reasons),
        seconds=time.perf_counter() - start,
        regions_dropped=skipped.regions,
        questions_skipped=skipped.questions,
    )
    logger.info(
        "%s: wrote %s to %s in %.1f s (%.0f rows/s); skipped %d rows, dropped %d regions, skipped %d questions",
        format, stats.rows_written, output_dir, stats.seconds, stats.rows_per_second,
        stats.rows_skipped, stats.regions_dropped, stats.questions_skipped,
    )
    if stats.skip_reasons:
        logger.warning("%s: left out %s", format, skipped.describe())
    return stats
