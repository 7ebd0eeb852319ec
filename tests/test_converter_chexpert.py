"""The chexpert converter (CheXpert) and its labeler-value parsing."""

import shutil
from pathlib import Path

import pytest
from converter_helpers import FIXTURES, reasons, run, write_image

from regionmed_clip.data.converters import chexpert

CHEXPERT = FIXTURES / "chexpert/CheXpert-v1.0-small"


def chexpert_paths() -> list[str]:
    """Every `Path` of the fixture CSVs but patient00007's (its image is the missing one)."""
    paths = [line.split(",")[0] for name in ("train.csv", "valid.csv")
             for line in (CHEXPERT / name).read_text().splitlines()[1:]]
    return [path for path in paths if "patient00007" not in path]


def chexpert_row(patient: str, study: str = "study1", view: str = "view1_frontal", split: str = "train") -> str:
    return f"CheXpert-v1.0-small/{split}/{patient}/{study}/{view}.jpg"


def test_chexpert_folder_with_images_beside_the_csvs(tmp_path):
    """The input is the CheXpert-v1.0-small folder; images default to it: `Path` minus its first folder."""
    root = shutil.copytree(CHEXPERT, tmp_path / "CheXpert-v1.0-small")
    for path in chexpert_paths():
        write_image(root / Path(path).relative_to("CheXpert-v1.0-small"))
    stats, rows = run("chexpert", root, None, tmp_path / "out")
    assert stats.rows_written == {"train": 6, "validation": 1}
    assert reasons(stats) == {"unknown label value Edema='2.0'": 1, "missing image": 1}

    def labels(patient, **where):
        row = rows[chexpert_row(patient, **where)]
        return row["labels"], row["uncertain_labels"]

    # 1.0 / 0.0 / blank: positives only; "No Finding" is the dataset's own class
    assert labels("patient00001") == (["No Finding", "Support Devices"], [])
    assert labels("patient00002", study="study2") == (
        ["Lung Opacity", "Fracture"], ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"])
    assert labels("patient00002", view="view2_lateral") == (["Lung Opacity", "Fracture"], [])
    assert labels("patient00003") == (["Edema"], [])
    assert labels("patient00004") == (["Lung Opacity"], ["Edema"])  # written 0 / 1 / -1
    assert labels("patient00005") == ([], ["Pneumonia"])
    assert labels("patient64541", split="valid") == (["No Finding"], [])

    first = rows[chexpert_row("patient00001")]
    assert (first["modality"], first["regions"], first["image"].size) == ("chest_xray", [], (64, 64))
    assert first["summary_caption"] == first["report_caption"] == "Chest X-ray with support devices."
    uncertain = rows[chexpert_row("patient00002", study="study2")]
    assert uncertain["summary_caption"] == "Chest X-ray with lung opacity and fracture."
    assert uncertain["report_caption"] == uncertain["summary_caption"]  # the uncertain classes are not named
    edema = rows[chexpert_row("patient00003")]
    assert edema["summary_caption"] == "Chest X-ray with edema." and edema["negative_captions"]
    # nothing positive is not "no finding"; a "No Finding" row is
    only_uncertain = rows[chexpert_row("patient00005")]
    assert only_uncertain["summary_caption"] == only_uncertain["report_caption"] == "Chest X-ray."
    normal = rows[chexpert_row("patient64541", split="valid")]
    assert (normal["split"], normal["summary_caption"], normal["report_caption"]) == (
        "validation", "Chest X-ray with no finding.", "No abnormality is seen.")


def test_chexpert_file_with_images_under_the_parent_folder(tmp_path):
    """`Path` as written, relative to the folder that holds CheXpert-v1.0-small; a lateral view kept by default."""
    images = tmp_path / "chexpert"
    for path in chexpert_paths():
        write_image(images / path, size=(40, 32))
    stats, rows = run("chexpert", CHEXPERT / "train.csv", images, tmp_path / "out")
    assert stats.rows_written == {"train": 6} and stats.rows_skipped == 2
    lateral = rows[chexpert_row("patient00002", view="view2_lateral")]
    assert lateral["image"].size == (40, 32) and lateral["labels"] == ["Lung Opacity", "Fracture"]


def test_chexpert_frontal_only_and_unknown_values(tmp_path):
    lines = (CHEXPERT / "valid.csv").read_text().splitlines()
    lines += [lines[1].replace("1.0,0.0,", f"{value},0.0,", 1).replace("patient64541", f"patient9{index}")
              for index, value in enumerate(["yes", "1.00", "nan"])]
    csv_path = tmp_path / "valid.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    images = tmp_path / "images"
    for path in [*chexpert_paths(), *(chexpert_row(f"patient9{index}", split="valid") for index in range(3))]:
        write_image(images / path)
    stats, rows = run("chexpert", csv_path, images, tmp_path / "out")
    assert list(rows) == [chexpert_row("patient64541", split="valid")]
    assert reasons(stats) == {"unknown label value No Finding='yes'": 1, "unknown label value No Finding='1.00'": 1,
                              "unknown label value No Finding='nan'": 1}

    stats, rows = run("chexpert", CHEXPERT / "train.csv", images, tmp_path / "frontal", frontal_only=True)
    assert stats.rows_written == {"train": 5} and chexpert_row("patient00002", view="view2_lateral") not in rows
    assert reasons(stats) == {"not a frontal view": 1, "unknown label value Edema='2.0'": 1, "missing image": 1}


def test_chexpert_labels_parsing():
    row = dict.fromkeys(chexpert._CHEXPERT_CLASSES, "")
    assert chexpert._chexpert_labels(row) == ([], [])
    row.update({"Edema": "1", "Atelectasis": "-1.0", "Fracture": "0", "Cardiomegaly": "-1", "Pneumonia": "1.0"})
    assert chexpert._chexpert_labels(row) == (["Edema", "Pneumonia"], ["Cardiomegaly", "Atelectasis"])
    with pytest.raises(ValueError, match=r"unknown label value Fracture='0.5'"):
        chexpert._chexpert_labels({**row, "Fracture": "0.5"})


def test_chexpert_duplicates_and_short_rows(tmp_path):
    """A Path listed twice: identical rows keep one (counted), disagreeing rows keep none; a row cut short (4 of 19
    fields) is skipped as malformed, not written without labels (the shared rules, issue 21 item 7)."""
    root = tmp_path / "CheXpert-v1.0-small"
    header = (CHEXPERT / "valid.csv").read_text().splitlines()[0]

    def line(patient, no_finding="1.0"):
        return f"{chexpert_row(patient, split='valid')},Female,68,Frontal,AP,{no_finding}" + "," * 13

    lines = [header, line("p1"), line("p1"), line("p2"), line("p2", no_finding="0.0"),
             f"{chexpert_row('p3', split='valid')},Female,68,Frontal", line("p4")]
    for patient in ("p1", "p2", "p3", "p4"):
        write_image(root / Path(chexpert_row(patient, split="valid")).relative_to("CheXpert-v1.0-small"))
    (root / "valid.csv").write_text("\n".join(lines) + "\n")
    stats, rows = run("chexpert", root, None, tmp_path / "out")
    assert sorted(rows) == [chexpert_row("p1", split="valid"), chexpert_row("p4", split="valid")]
    assert reasons(stats) == {"duplicate image (Path)": 1, "image (Path) listed twice, disagreeing": 1,
                              "malformed row (fields do not match the header)": 1}
    assert stats.rows_skipped == 3
