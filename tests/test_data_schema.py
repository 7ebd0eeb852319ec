import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import IterableDataset, load_dataset, load_from_disk
from PIL import Image

from regionmed_clip.data.schema import (
    CANONICAL_FEATURES,
    ShardedParquetWriter,
    export_to_disk,
    load_canonical,
    validate_row,
    write_rows,
)


def make_row(index: int, split: str = "train", image=None) -> dict:
    return {
        "image": image if image is not None else Image.fromarray(np.full((20, 30), index, dtype=np.uint8)),
        "image_id": f"img-{index}",
        "modality": "chest_xray",
        "summary_caption": "Chest X-ray with nodule.",
        "report_caption": f"There is a small nodule in the left upper zone {index}.",
        "regions": [{"bbox": [1.0, 2.0, 5.0, 6.0], "caption": "small nodule in the left upper zone", "label": "nodule"}],
        "negative_captions": ["There is a small nodule in the right upper zone."],
        "labels": ["nodule"],
        "uncertain_labels": [],
        "split": split,
    }


def test_round_trip_through_parquet_shards(tmp_path):
    rows = [make_row(i, "train" if i < 5 else "test") for i in range(7)]
    counts = write_rows(rows, tmp_path, rows_per_shard=2)
    assert counts == {"train": 5, "test": 2}
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "test-00000.parquet", "train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    train = load_canonical(tmp_path, "train")
    assert len(train) == 5
    first = train[0]
    assert first["image"].size == (30, 20)
    assert np.asarray(first["image"])[0, 0] == 0
    assert first["regions"][0]["bbox"] == [1.0, 2.0, 5.0, 6.0]
    assert first["negative_captions"] == rows[0]["negative_captions"]


def test_images_are_embedded_not_referenced(tmp_path):
    path = tmp_path / "film.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(path)
    write_rows([make_row(0, image=path)], tmp_path / "out")
    path.unlink()  # the dataset must not need the original file any more
    table = pq.read_table(next((tmp_path / "out").glob("*.parquet")))
    assert table.column("image")[0]["bytes"].as_py() is not None
    assert load_canonical(tmp_path / "out")[0]["image"].size == (8, 8)


def test_sixteen_bit_images_survive(tmp_path):
    image = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    write_rows([make_row(0, image=image)], tmp_path)
    loaded = load_canonical(tmp_path)[0]["image"]
    assert loaded.mode.startswith("I") and np.asarray(loaded).max() == 63000


def test_streaming_and_load_from_disk(tmp_path):
    write_rows([make_row(i) for i in range(3)], tmp_path / "parquet", rows_per_shard=1)
    stream = load_canonical(tmp_path / "parquet", streaming=True)
    assert isinstance(stream, IterableDataset)
    assert [row["image_id"] for row in stream] == ["img-0", "img-1", "img-2"]
    export_to_disk(tmp_path / "parquet", tmp_path / "arrow")
    assert len(load_from_disk(str(tmp_path / "arrow"))["train"]) == 3
    assert load_canonical(tmp_path / "arrow")[1]["image_id"] == "img-1"


def test_duplicate_image_ids_are_left_out_in_every_form(tmp_path, caplog):
    rows = [make_row(i) for i in range(5)]
    rows[3]["image_id"] = rows[4]["image_id"] = rows[1]["image_id"]
    write_rows(rows, tmp_path / "parquet", rows_per_shard=2)  # the copies of img-1 in three shards
    export_to_disk(tmp_path / "parquet", tmp_path / "arrow")  # itself loads through the same rule
    assert len(load_from_disk(str(tmp_path / "arrow"))["train"]) == 2
    write_rows([make_row(0), make_row(0)], tmp_path / "twice", rows_per_shard=2)
    with caplog.at_level("WARNING", logger="regionmed_clip.data.schema"):
        for streaming in (False, True):
            loaded = load_canonical(tmp_path / "parquet", streaming=streaming, decode_images=False)
            assert [row["image_id"] for row in loaded] == ["img-0", "img-2"]
            assert [row["image_id"] for row in loaded] == ["img-0", "img-2"]  # a second epoch streams the same
        assert [row["image_id"] for row in load_canonical(tmp_path / "twice", streaming=True)] == []
    assert caplog.text.count("1 image_id(s) appear in more than one row (3 rows, e.g. 'img-1')") == 3  # export, then two loads
    assert "(2 rows, e.g. 'img-0')" in caplog.text


def test_undecoded_images_for_the_collator(tmp_path):
    write_rows([make_row(0)], tmp_path)
    image = load_canonical(tmp_path, decode_images=False)[0]["image"]
    assert isinstance(image, dict) and image["bytes"].startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"split": "dev"}, "split must be one of"),
        ({"image_id": ""}, "image_id is empty"),
        ({"labels": "nodule"}, "labels must be a list of str"),
        ({"uncertain_labels": [1]}, "uncertain_labels must be a list of str"),
        ({"uncertain_labels": ["edema", "nodule"]}, r"\['nodule'\] both in labels and uncertain_labels"),
        ({"regions": [{"bbox": [5, 2, 1, 6], "caption": "c", "label": "l"}]}, r"regions\[0\].bbox .* inverted"),
        ({"regions": [{"bbox": [1, 2, 3], "caption": "c", "label": "l"}]}, r"regions\[0\].bbox must be 4"),
        ({"regions": [{"bbox": [1, 2, 3, float("nan")], "caption": "c", "label": "l"}]}, "finite"),
        ({"regions": [{"bbox": [1, 2, 3, 4], "caption": "c"}]}, "keys bbox, caption, label"),
        ({"extra": 1}, r"unexpected \['extra'\]"),
    ],
)
def test_bad_rows_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        validate_row({**make_row(0), **change}, where="row 7")


def test_writer_refuses_to_mix_datasets(tmp_path):
    write_rows([make_row(0)], tmp_path)
    with pytest.raises(FileExistsError, match="already holds parquet shards"):
        ShardedParquetWriter(tmp_path)


def test_missing_split_is_named(tmp_path):
    write_rows([make_row(0)], tmp_path)
    with pytest.raises(ValueError, match="split 'test' not found.*train"):
        load_canonical(tmp_path, "test")


def test_uncertain_labels_round_trip(tmp_path):
    write_rows([{**make_row(0), "uncertain_labels": ["edema", "atelectasis"]}, make_row(1)], tmp_path)
    assert load_canonical(tmp_path)["uncertain_labels"] == [["edema", "atelectasis"], []]


def write_old_format(rows: list[dict], path) -> None:
    """Shards as written before `uncertain_labels` existed: the canonical shards without that column."""
    write_rows(rows, path, rows_per_shard=2)
    for shard in path.glob("*.parquet"):
        table = pq.read_table(shard).drop_columns(["uncertain_labels"])
        pq.write_table(table.replace_schema_metadata(None), shard)
    assert all("uncertain_labels" not in pq.read_schema(shard).names for shard in path.glob("*.parquet"))


def test_old_datasets_without_uncertain_labels_still_load(tmp_path):
    write_old_format([make_row(i) for i in range(3)], tmp_path / "old")
    loaded = load_canonical(tmp_path / "old")
    assert loaded.features["uncertain_labels"] == CANONICAL_FEATURES["uncertain_labels"]
    assert loaded["uncertain_labels"] == [[], [], []] and loaded["labels"] == [["nodule"]] * 3
    assert loaded[2]["image"].size == (30, 20) and loaded[2]["image_id"] == "img-2"
    stream = load_canonical(tmp_path / "old", streaming=True, decode_images=False)
    assert [(row["image_id"], row["uncertain_labels"]) for row in stream] == [("img-0", []), ("img-1", []),
                                                                              ("img-2", [])]
    assert next(iter(stream))["image"]["bytes"].startswith(b"\x89PNG")
    # an old save_to_disk folder, and one exported now from old shards
    old_arrow = load_dataset("parquet", data_files={"train": str(tmp_path / "old" / "train-*.parquet")}, split="train")
    old_arrow.save_to_disk(str(tmp_path / "old_arrow"))
    assert load_canonical(tmp_path / "old_arrow")["uncertain_labels"] == [[], [], []]
    export_to_disk(tmp_path / "old", tmp_path / "exported")
    assert load_from_disk(str(tmp_path / "exported"))["train"]["uncertain_labels"] == [[], [], []]


def test_provenance_says_whether_the_data_is_real(tmp_path):
    from regionmed_clip.data.schema import read_provenance, write_provenance
    from regionmed_clip.data.synthetic import write_synthetic_dataset

    assert read_provenance(tmp_path) is None  # a folder written before provenance was recorded
    write_provenance(tmp_path, "chexpert", real_patient_data=True, input="CheXpert-v1.0-small", rows={"train": 3})
    record = read_provenance(tmp_path)
    assert (record["source"], record["real_patient_data"], record["rows"]) == ("chexpert", True, {"train": 3})
    synthetic = tmp_path / "synth"
    write_synthetic_dataset(synthetic, n=12, seed=3)
    record = read_provenance(synthetic)
    assert (record["source"], record["real_patient_data"], record["seed"], record["n"]) == (
        "regionmed-data synth", False, 3, 12)


def _rewrite_shard(folder, change) -> None:
    (shard,) = sorted(folder.glob("train-*.parquet"))
    pq.write_table(change(pq.read_table(shard)), shard)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda table: table.drop_columns(["report_caption"]), r"train-00000.parquet: column 'report_caption' is missing"),
        (lambda table: table.set_column(table.schema.get_field_index("report_caption"), "report_caption",
                                        pa.array(list(range(table.num_rows)))),
         r"column 'report_caption' is int64, expected string"),
        (lambda table: table.set_column(
            table.schema.get_field_index("regions"), "regions",
            pa.array([[{"bbox": [1.0, 2.0, 5.0, 6.0], "caption": "c"}]] * table.num_rows)),
         r"column 'regions' is list<element: struct<bbox: list<element: double>, caption: string>>, expected"),
        (lambda table: table.append_column("notes", pa.array(["x"] * table.num_rows)),
         r"columns \['notes'\] are not canonical"),
        (lambda table: table.set_column(
            table.schema.get_field_index("regions"), "regions",
            pa.array([[{"bbox": [1.0, 2.0, 5.0, 6.0], "caption": "c", "label": "l"},
                       {"bbox": [1.0, 2.0, 5.0, 6.0, 7.0], "caption": "c", "label": "l"}]] * table.num_rows)),
         r"train-00000.parquet: column 'regions': 3 bbox value\(s\) do not hold 4 numbers \(the first: row 0 of the "
         r"shard, 5 numbers\)"),
        (lambda table: table.set_column(
            table.schema.get_field_index("regions"), "regions",
            pa.array([[{"bbox": [1.0, 2.0, 5.0], "caption": "c", "label": "l"}]] * table.num_rows,
                     pa.list_(pa.struct([("bbox", pa.list_(pa.float32(), 3)), ("caption", pa.string()),
                                         ("label", pa.string())])))),
         r"column 'regions' has bbox fixed_size_list<element: float>\[3\], expected fixed_size_list<item: float>\[4\]"),
    ],
    ids=["missing column", "numbers for text", "region without label", "extra column", "boxes of 5 numbers",
         "fixed boxes of 3 numbers"],
)
def test_a_shard_with_another_schema_is_refused_naming_file_and_column(tmp_path, change, message):
    write_rows([make_row(i) for i in range(3)], tmp_path)
    _rewrite_shard(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        load_canonical(tmp_path, "train")


def test_numbers_of_another_width_still_read(tmp_path):
    write_rows([make_row(i) for i in range(3)], tmp_path)
    regions_type = pa.list_(pa.struct([("bbox", pa.list_(pa.float64())), ("caption", pa.string()),
                                       ("label", pa.string())]))
    _rewrite_shard(tmp_path, lambda table: table.set_column(
        table.schema.get_field_index("regions"), "regions", table.column("regions").cast(regions_type)))
    assert load_canonical(tmp_path, "train")[0]["regions"][0]["bbox"] == [1.0, 2.0, 5.0, 6.0]


def test_the_writer_refuses_image_bytes_the_reader_cannot_open(tmp_path):
    dicom_like = b"\0" * 128 + b"DICM" + b"\0" * 64
    with pytest.raises(ValueError, match=r"row 'img-0': image: bytes that PIL cannot read \(DICOM: convert it"):
        write_rows([make_row(0, image=dicom_like)], tmp_path)
    assert not list(tmp_path.glob("*.parquet"))


def test_dataset_output_gives_the_folder_a_plain_mode_and_names_a_broken_provenance(tmp_path):
    from regionmed_clip.data.schema import dataset_output, read_provenance

    umask = os.umask(0o022)
    try:
        with dataset_output(tmp_path / "out") as staging:
            (staging / "provenance.json").write_text("{not json")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    with pytest.raises(ValueError, match="provenance.json' is not valid JSON"):
        read_provenance(tmp_path / "out")
