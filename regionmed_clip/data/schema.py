"""The canonical region-annotated schema, its validation, a streaming parquet shard writer and loaders.

One row is one image with its captions at four levels (see docs/DATA.md):

    image              datasets.Image, stored as embedded bytes (never a path)
    image_id           str, unique within a dataset
    modality           str, e.g. "chest_xray", "ct", "mri"
    summary_caption    str, one short sentence
    report_caption     str, the findings / report text
    regions            list of {bbox: [x0, y0, x1, y1] pixels of the stored image, caption: str, label: str}
    negative_captions  list of str, hard negatives of the report
    labels             list of str, class names present (for zero-shot evaluation)
    uncertain_labels   list of str, classes the source marks uncertain (CheXpert -1); never also in labels
    split              "train" | "validation" | "test"
"""

import contextlib
import datetime
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, Features, IterableDataset, List, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image

__all__ = [
    "CANONICAL_FEATURES",
    "SPLITS",
    "ShardedParquetWriter",
    "check_shard_schema",
    "STAGING_LOCK",
    "dataset_output",
    "region_problem",
    "remove_stale_staging",
    "text_problem",
    "encode_image",
    "export_to_disk",
    "PROVENANCE_FILE",
    "load_canonical",
    "read_provenance",
    "validate_row",
    "write_provenance",
    "write_rows",
]

SPLITS = ("train", "validation", "test")

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale staging folders are then left alone
    fcntl = None

CANONICAL_FEATURES = Features(
    {
        "image": ImageFeature(),
        "image_id": Value("string"),
        "modality": Value("string"),
        "summary_caption": Value("string"),
        "report_caption": Value("string"),
        "regions": List(
            {"bbox": List(Value("float32"), length=4), "caption": Value("string"), "label": Value("string")}
        ),
        "negative_captions": List(Value("string")),
        "labels": List(Value("string")),
        "uncertain_labels": List(Value("string")),
        "split": Value("string"),
    }
)

# Added to the schema after datasets were written without it: such a dataset reads it as empty lists.
_LATER_COLUMN = "uncertain_labels"

_STRING_FIELDS = ("image_id", "modality", "summary_caption", "report_caption", "split")


def encode_image(image: Any) -> dict[str, Any]:
    """PIL image, raw bytes or a file path -> `{"bytes": ..., "path": name}` with the bytes embedded.

    PIL images are stored as PNG (lossless, keeps 16-bit "I;16"); files keep their own encoding.
    """
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} does not exist")
        return {"bytes": path.read_bytes(), "path": path.name}
    if isinstance(image, Mapping) and image.get("bytes"):
        return {"bytes": image["bytes"], "path": image.get("path")}
    raise TypeError(f"image must be a PIL image, bytes or a file path, got {type(image).__name__}")


def _check_readable(image: Mapping[str, Any], where: str) -> None:
    """Refuse image bytes the reader (PIL, in the collator) cannot open: the writer must not accept
    what training would then skip, e.g. DICOM bytes stored as they are."""
    try:
        with Image.open(io.BytesIO(image["bytes"])) as opened:
            opened.verify()
    except Exception as error:  # PIL raises many types
        hint = " (DICOM: convert it with `regionmed-data convert`)" if image["bytes"][128:132] == b"DICM" else ""
        raise ValueError(f"{where}: image: bytes that PIL cannot read{hint}: {error}") from None


def _types_match(found: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a shard's column type reads as the canonical one without changing any value: the same
    kind (text as text, numbers as numbers), list flavours and struct keys alike."""
    if pa.types.is_string(expected) or pa.types.is_large_string(expected):
        return pa.types.is_string(found) or pa.types.is_large_string(found)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(found) or pa.types.is_integer(found)
    if pa.types.is_binary(expected):
        return pa.types.is_binary(found) or pa.types.is_large_binary(found)
    if pa.types.is_list(expected) or pa.types.is_fixed_size_list(expected):
        lists = pa.types.is_list(found) or pa.types.is_large_list(found) or pa.types.is_fixed_size_list(found)
        return lists and _types_match(found.value_type, expected.value_type)
    if pa.types.is_struct(expected):
        return (pa.types.is_struct(found) and {field.name for field in found} == {field.name for field in expected}
                and all(_types_match(found.field(field.name).type, field.type) for field in expected))
    return found.equals(expected)


def check_shard_schema(shard: Path) -> None:
    """Raise ValueError naming the shard and the column when its schema is not the canonical one
    (a missing column would otherwise read as nulls, a wrong type as silently converted values)."""
    schema = pq.read_schema(shard)
    for field in CANONICAL_FEATURES.arrow_schema:
        if field.name not in schema.names:
            if field.name == _LATER_COLUMN:
                continue
            raise ValueError(f"{shard}: column {field.name!r} is missing; a canonical shard has "
                             f"{CANONICAL_FEATURES.arrow_schema.names}")
        found = schema.field(field.name).type
        if not _types_match(found, field.type):
            raise ValueError(f"{shard}: column {field.name!r} is {found}, expected {field.type}")
    extra = sorted(set(schema.names) - set(CANONICAL_FEATURES))
    if extra:
        raise ValueError(f"{shard}: columns {extra} are not canonical (they would be dropped)")
    _check_bbox_lengths(shard, schema)


def _check_bbox_lengths(shard: Path, schema: pa.Schema) -> None:
    """A `regions.bbox` stored as a variable-length list reads as the fixed-size list of 4 only when every
    box has 4 values: one that has not would fail deep inside `datasets` (DatasetGenerationError). Reads the
    regions column only, and only when the type does not already fix the length."""
    expected = CANONICAL_FEATURES.arrow_schema.field("regions").type.value_type
    bbox_type = schema.field("regions").type.value_type.field("bbox").type
    if pa.types.is_fixed_size_list(bbox_type):
        if bbox_type.list_size != 4:
            raise ValueError(f"{shard}: column 'regions' has bbox {bbox_type}, expected {expected.field('bbox').type}")
        return
    regions = pq.read_table(shard, columns=["regions"]).column("regions").combine_chunks()
    lengths = pc.list_value_length(pc.struct_field(pc.list_flatten(regions), "bbox"))
    wrong = pc.and_(pc.is_valid(lengths), pc.not_equal(lengths, 4))
    count = pc.sum(wrong).as_py() or 0
    if count:
        row_of_region = pc.list_parent_indices(regions)
        first = pc.index(wrong, True).as_py()
        raise ValueError(f"{shard}: column 'regions': {count} bbox value(s) do not hold 4 numbers (the first: row "
                         f"{row_of_region[first].as_py()} of the shard, {lengths[first].as_py()} numbers); a canonical "
                         f"bbox is [x0, y0, x1, y1], {expected.field('bbox').type}")


def text_problem(value: Any, name: str) -> str | None:
    """Why `value` cannot serve as the text field `name` (a caption, an id), or None: the one wording
    training's collator and evaluation skip rows with."""
    if not isinstance(value, str):
        return f"{name} is {'missing or null' if value is None else type(value).__name__ + ', not text'}"
    if not value.strip():
        return f"{name} is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{name} is not valid UTF-8 (a lone surrogate)"
    return None


def region_problem(region: Any, width: int, height: int, image_processor: Any = None, caption: bool = False,
                   label: bool = False) -> str | None:
    """Why `region` (a canonical region on a `width x height` image) cannot be used, or None: the one
    check training's collator and evaluation drop regions with. Its caption and label are checked when
    asked for; with an `image_processor`, a box its global view cuts off entirely is refused too."""
    if not isinstance(region, Mapping):
        return f"region is {type(region).__name__}, not a mapping"
    bbox = region.get("bbox")
    if bbox is None:
        return "bbox missing or null"
    if (not isinstance(bbox, Sequence) or isinstance(bbox, str) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        return "bbox is not 4 numbers"
    if not all(math.isfinite(v) for v in bbox):
        return "bbox holds NaN or inf"
    if caption and (problem := text_problem(region.get("caption"), "region caption")):
        return problem
    if label and (problem := text_problem(region.get("label"), "region label")):
        return problem
    x0, y0, x1, y1 = bbox
    if not (x1 > x0 and y1 > y0):
        return "box inverted or of zero area"
    if not (x1 > 0 and y1 > 0 and x0 < width and y0 < height):
        return "box outside the image"
    if image_processor is not None and not image_processor.region_has_view_area(bbox, height, width):
        return "box outside the global view (cut off by its crop)"
    return None


def validate_row(row: Mapping[str, Any], where: str = "row") -> None:
    """Raise ValueError naming the field (and `where`) if `row` does not fit the canonical schema."""
    missing = sorted(set(CANONICAL_FEATURES) - set(row))
    extra = sorted(set(row) - set(CANONICAL_FEATURES))
    if missing or extra:
        raise ValueError(f"{where}: fields missing {missing} / unexpected {extra}")
    for field in _STRING_FIELDS:
        if not isinstance(row[field], str):
            raise ValueError(f"{where}.{field} must be a str, got {type(row[field]).__name__}")
    if not row["image_id"]:
        raise ValueError(f"{where}.image_id is empty")
    if row["split"] not in SPLITS:
        raise ValueError(f"{where}.split must be one of {SPLITS}, got {row['split']!r}")
    for field in ("negative_captions", "labels", "uncertain_labels"):
        values = row[field]
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}.{field} must be a list of str")
    both = sorted(set(row["labels"]) & set(row["uncertain_labels"]))
    if both:
        raise ValueError(f"{where}: {both} both in labels and uncertain_labels")
    if not isinstance(row["regions"], (list, tuple)):
        raise ValueError(f"{where}.regions must be a list")
    for index, region in enumerate(row["regions"]):
        place = f"{where}.regions[{index}]"
        if not isinstance(region, Mapping) or set(region) != {"bbox", "caption", "label"}:
            raise ValueError(f"{place} must be a dict with keys bbox, caption, label")
        bbox = region["bbox"]
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
            raise ValueError(f"{place}.bbox must be 4 finite numbers [x0, y0, x1, y1], got {bbox!r}")
        if bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            raise ValueError(f"{place}.bbox {list(bbox)} is inverted or has zero area")
        if not isinstance(region["caption"], str) or not isinstance(region["label"], str):
            raise ValueError(f"{place}.caption and .label must be str")


class ShardedParquetWriter:
    """Stream canonical rows into `OUT/{split}-{index:05d}.parquet` shards of `rows_per_shard` rows.

    Memory holds one shard's rows at most; image bytes are embedded. Use as a context manager;
    `counts` gives rows written per split.
    """

    def __init__(self, output_dir: str | Path, rows_per_shard: int = 1000):
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.output_dir.glob("*.parquet"))
        if existing:
            raise FileExistsError(f"{self.output_dir} already holds parquet shards ({existing[0].name}, ...): refusing to mix datasets")
        self.rows_per_shard = rows_per_shard
        self.schema = CANONICAL_FEATURES.arrow_schema
        self.counts: dict[str, int] = {}
        self._buffers: dict[str, list[dict[str, Any]]] = {}
        self._shard_index: dict[str, int] = {}

    def write(self, row: Mapping[str, Any]) -> None:
        where = f"row {row.get('image_id', '?')!r}"
        validate_row(row, where=where)
        image = encode_image(row["image"])
        _check_readable(image, where)
        encoded = CANONICAL_FEATURES.encode_example({**row, "image": image})
        split = row["split"]
        self._buffers.setdefault(split, []).append(encoded)
        self.counts[split] = self.counts.get(split, 0) + 1
        if len(self._buffers[split]) >= self.rows_per_shard:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._buffers.get(split)
        if not rows:
            return
        index = self._shard_index.get(split, 0)
        table = pa.Table.from_pylist(rows, schema=self.schema)
        final = self.output_dir / f"{split}-{index:05d}.parquet"
        partial = final.with_suffix(".parquet.partial")
        pq.write_table(table, partial)
        partial.replace(final)  # a shard appears whole or not at all
        self._shard_index[split] = index + 1
        self._buffers[split] = []

    def close(self) -> dict[str, int]:
        for split in list(self._buffers):
            self._flush(split)
        return dict(self.counts)

    def __enter__(self) -> "ShardedParquetWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def write_rows(rows: Iterable[Mapping[str, Any]], output_dir: str | Path, rows_per_shard: int = 1000) -> dict[str, int]:
    """Write an iterable of canonical rows as parquet shards; returns rows per split."""
    with ShardedParquetWriter(output_dir, rows_per_shard) as writer:
        for row in rows:
            writer.write(row)
    return writer.counts


def _data_files(path: Path) -> dict[str, str]:
    files = {split: str(path / f"{split}-*.parquet") for split in SPLITS if any(path.glob(f"{split}-*.parquet"))}
    if not files:
        raise FileNotFoundError(f"no canonical parquet shards ({'|'.join(SPLITS)}-*.parquet) in {str(path)!r}")
    return files


def _with_later_column(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """A dataset written before `uncertain_labels` existed, with that column as empty lists; others unchanged."""
    if _LATER_COLUMN in (dataset.column_names or ()):
        return dataset
    if isinstance(dataset, IterableDataset):
        column_type = CANONICAL_FEATURES.arrow_schema.field(_LATER_COLUMN).type

        def add(batch: pa.Table) -> pa.Table:
            return batch.append_column(_LATER_COLUMN, pa.array([[]] * len(batch), column_type))

        # On arrow batches: a row-wise map would decode (and re-encode) every image on the way.
        return dataset.with_format("arrow").map(add, batched=True, features=CANONICAL_FEATURES).with_format(None)
    # add_column joins an in-memory column to the memory-mapped table: the data (images) is not rewritten.
    return dataset.add_column(_LATER_COLUMN, [[]] * len(dataset), feature=CANONICAL_FEATURES[_LATER_COLUMN])


PROVENANCE_FILE = "provenance.json"


def write_provenance(output_dir: str | Path, source: str, real_patient_data: bool, **details: Any) -> Path:
    """Record where a canonical dataset came from, next to its shards: `{"source": the generator or
    converter format, "real_patient_data": bool, "created": ISO date, ...details}`. Model cards
    (`regionmed-export`) state the training data from it."""
    record = {"source": source, "real_patient_data": real_patient_data,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **details}
    path = Path(output_dir) / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def read_provenance(data_dir: str | Path) -> dict[str, Any] | None:
    """The dataset's provenance record, or None for a folder written before it was recorded."""
    path = Path(data_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None


STAGING_LOCK = ".staging.lock"  # held (flock) inside a staging folder while its run is alive
_STAGING_AGE_S = 3600.0  # a staging folder without a lock file (not yet locked, or older code) is stale past this


def _is_stale(staging: Path) -> bool:
    """Whether the staging folder belongs to no living run: its lock file's flock can be taken (the kernel drops a
    dead process's locks, SIGKILL included), or, without a lock file, it is over `_STAGING_AGE_S` old."""
    lock = staging / STAGING_LOCK
    if not lock.is_file():
        return time.time() - staging.stat().st_mtime > _STAGING_AGE_S
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a living run writes into it
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def remove_stale_staging(output_dir: str | Path) -> list[Path]:
    """Remove the staging folders (`.{name}.partial-*` beside `output_dir`) that killed runs writing `output_dir`
    left behind; a folder a living run still writes into is kept. Returns what was removed."""
    output_dir = Path(output_dir)
    if fcntl is None or not output_dir.parent.is_dir():
        return []
    removed = []
    for staging in output_dir.parent.glob(f".{output_dir.name}.partial-*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: left as it is
            if staging.is_dir() and not staging.is_symlink() and _is_stale(staging):
                shutil.rmtree(staging)
                removed.append(staging)
    return removed


@contextlib.contextmanager
def dataset_output(output_dir: str | Path) -> Iterator[Path]:
    """A hidden staging folder beside `output_dir` to write a dataset (or any output folder) into, renamed to
    `output_dir` only when the block finishes and removed when it fails: an interrupted or failed write never
    leaves files that load as complete. It survives SIGKILL too: the folder is locked while its run lives, and
    the next run writing the same output removes the staging folders of dead runs first. `output_dir` must be
    new or empty."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty: write the dataset into a new folder (refusing to mix datasets)")
    removed = remove_stale_staging(output_dir)
    if removed:
        logger.warning("removed %d staging folder(s) of an earlier, killed run: %s", len(removed),
                       ", ".join(str(path) for path in removed))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        with _locked_while_written(staging):
            yield staging
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700, made what a plain mkdir would have given
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked_while_written(staging: Path) -> Iterator[None]:
    """Hold an flock on `staging`'s lock file while the block runs (the kernel drops it when the process dies,
    SIGKILL included); the lock file is not part of the output."""
    lock = staging / STAGING_LOCK
    with open(lock, "w") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # not part of the output


def load_canonical(
    path: str | Path, split: str = "train", streaming: bool = False, decode_images: bool = True
) -> Dataset | IterableDataset:
    """Load one split of a canonical dataset from parquet shards or a `save_to_disk` folder.

    `decode_images=False` leaves images as `{"bytes", "path"}` so a training collator can decode
    them and skip a corrupt one instead of failing inside the DataLoader. A dataset written before
    `uncertain_labels` was added reads it as empty lists.

    `image_id` must be unique within the split: every row of an id found in more than one row is
    left out, with a warning naming the ids and the count (the converters' rule for an id listed
    twice: which row is right is unknowable). Only the id column is read to find them.
    """
    path = Path(path)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = load_from_disk(str(path))
        if hasattr(loaded, "keys") and split not in loaded:
            raise ValueError(f"split {split!r} not found in {str(path)!r}; available: {sorted(loaded)}")
        dataset = _without_duplicate_ids(loaded[split] if hasattr(loaded, "keys") else loaded, None, path, split)
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        files = _data_files(path)
        if split not in files:
            raise ValueError(f"split {split!r} not found in {str(path)!r}; available: {sorted(files)}")
        for shard in sorted(path.glob(f"{split}-*.parquet")):
            check_shard_schema(shard)
        features = CANONICAL_FEATURES
        if _LATER_COLUMN not in pq.read_schema(min(path.glob(f"{split}-*.parquet"))).names:
            # Asked for, a column the shards lack would read as None rather than []: add it after loading instead.
            features = Features({name: value for name, value in features.items() if name != _LATER_COLUMN})
        dataset = load_dataset(
            "parquet", data_files={split: files[split]}, split=split, features=features, streaming=streaming
        )
        ids = pa.chunked_array([pq.read_table(shard, columns=["image_id"]).column("image_id")
                                for shard in sorted(path.glob(f"{split}-*.parquet"))]) if streaming else None
        dataset = _without_duplicate_ids(dataset, ids, path, split)
    dataset = _with_later_column(dataset)
    return dataset if decode_images else dataset.cast_column("image", ImageFeature(decode=False))


def _without_duplicate_ids(dataset: Dataset | IterableDataset, ids: pa.ChunkedArray | pa.Array | None, path: Path,
                           split: str) -> Dataset | IterableDataset:
    """`dataset` without the rows of any image_id found in more than one row (warned about); `ids` is its
    image_id column (read from a `Dataset` itself when None). Null ids are left to the collator's checks."""
    if ids is None:
        ids = dataset.select_columns(["image_id"]).with_format("arrow")[:]["image_id"]
    if not len(ids):
        return dataset
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.and_(pc.greater(counts.field("counts"), 1), pc.is_valid(counts.field("values"))))
    if not len(repeated):
        return dataset
    duplicates = set(repeated.field("values").to_pylist())
    rows = pc.sum(repeated.field("counts")).as_py()
    examples = sorted(duplicates)[:3]
    logger.warning("%s, split %r: %d image_id(s) appear in more than one row (%d rows, e.g. %s); image_id must be "
                   "unique within a dataset, so all %d rows are left out (which of them is right is unknowable)",
                   path, split, len(duplicates), rows, ", ".join(map(repr, examples)), rows)
    if isinstance(dataset, IterableDataset):
        return dataset.filter(lambda image_id: image_id not in duplicates, input_columns=["image_id"])
    keep = pc.indices_nonzero(pc.invert(pc.is_in(ids, value_set=pa.array(sorted(duplicates), pa.string()))))
    return dataset.select(keep.to_numpy())


def export_to_disk(parquet_dir: str | Path, output_dir: str | Path) -> None:
    """Convert parquet shards into a `DatasetDict.save_to_disk` folder (for `datasets.load_from_disk`)."""
    from datasets import DatasetDict

    splits = {split: load_canonical(parquet_dir, split) for split in _data_files(Path(parquet_dir))}
    DatasetDict(splits).save_to_disk(str(output_dir))
