"""Reading annotation files as streams: CSV (plain or gzip, row by row, stripped names and values, with errors that
name the file and line; a row with more or fewer fields than the header is skipped and counted) and JSON documents (loaded whole, errors naming line and column), and `_grouped`, which
groups (image_id, record) pairs by image through a temporary on-disk sqlite table read back `ORDER BY image_id`,
so memory holds one image's records whatever the dataset size."""

import contextlib
import csv
import gzip
import itertools
import json
import sqlite3
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

from .rows import SkipCounter

__all__ = ["MALFORMED_ROW", "_CsvRow", "_grouped", "_load_json", "_read_csv", "_text_lines"]


def _load_json(path: Path) -> Any:
    """A JSON document, with errors that name the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno} column {error.colno}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def _utf8_lines(handle: Iterable[bytes], path: Path) -> Iterator[str]:
    """The lines of a binary file as text (a leading BOM dropped); a line that is not UTF-8 is an error
    that names it (decoding the whole stream would only say which buffer failed)."""
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}, line {number}: not UTF-8 text ({error.reason})") from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 is an error that names the file and line."""
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; expected a text file")
    with open(path, "rb") as handle:
        yield from enumerate(_utf8_lines(handle, path), start=1)


class _CsvRow(dict):
    """A CSV row (column -> stripped value) that knows its line in the file, for errors that name it."""

    line: int = 0


MALFORMED_ROW = "malformed row (fields do not match the header)"  # the skip reason of a short or long CSV row


def _read_csv(path: Path, required: Sequence[str], skipped: SkipCounter) -> Iterator[_CsvRow]:
    """Stream a CSV's rows as dicts with stripped header names and values (SIIM writes `ImageId, EncodedPixels`);
    a `.gz` file is read as gzip (MIMIC-CXR-JPG ships its CSVs so).

    A row with fewer fields than the header names (cut short: its missing values would read as blanks) or with
    non-empty fields beyond them (an unquoted comma shifts its values) is skipped and counted in `skipped`.
    Raises ValueError when the file is empty, a required column is missing (the file is not in the expected
    format), or a `.gz` file is cut short or not gzip.
    """
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; expected a CSV file")
    opener = gzip.open if path.suffix == ".gz" else open
    line = 1
    try:
        with opener(path, "rb") as handle:
            reader = csv.reader(_utf8_lines(handle, path))
            try:
                header = [name.strip() for name in next(reader, [])]
                if not header:
                    raise ValueError(f"{str(path)!r} is empty; expected a CSV header with the columns {list(required)}")
                missing = [name for name in required if name not in header]
                if missing:
                    raise ValueError(f"{str(path)!r} lacks the columns {missing}; its header is {header}")
                # The header may end in unnamed columns (ChestX-ray14's trailing commas): rows need not fill those.
                named = max(index for index, name in enumerate(header) if name) + 1
                for values in reader:
                    if reader.line_num > line + 1 and any("\n" in value or "\r" in value for value in values):
                        # An annotation field never spans lines: this is an unterminated quote that swallowed rows.
                        raise ValueError(f"{path}, line {line + 1}: a quoted field runs to line {reader.line_num} "
                                         "(an unterminated quote?)")
                    line = reader.line_num
                    if not any(value.strip() for value in values):
                        continue
                    if len(values) < named or any(value.strip() for value in values[len(header):]):
                        skipped.skip_row(MALFORMED_ROW, f"{path}, line {line}: {len(values)} fields, the header "
                                                        f"{len(header)}")
                        continue
                    row = _CsvRow(itertools.zip_longest(header, (value.strip() for value in values), fillvalue=""))
                    row.line = line
                    yield row
            except csv.Error as error:
                raise ValueError(f"{path}, line {line + 1}: {error}") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(f"{path}, after line {line}: not a complete gzip file (cut short?): "
                         f"{error or type(error).__name__}") from None


def _grouped(records: Iterable[tuple[str, dict[str, Any]]], skipped: SkipCounter) -> Iterator[tuple[str, list[dict]]]:
    """Group (image_id, record) pairs by image id without holding them in memory.

    The records are spilled into a temporary on-disk sqlite table and read back `ORDER BY image_id` (then input
    order), so only one group is ever in memory. Records without an image id are skipped and counted.
    """

    def encoded() -> Iterator[tuple[str, str]]:
        for image_id, record in records:
            if image_id:
                yield image_id, json.dumps(record)
            else:
                skipped.skip_row("annotation without an image id", json.dumps(record))

    with (
        tempfile.TemporaryDirectory(prefix="regionmed-convert-") as folder,
        contextlib.closing(sqlite3.connect(Path(folder) / "spill.sqlite")) as db,
    ):
        # A throw-away file: no journal or fsync; the ORDER BY sort spills to temporary files, not memory.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA temp_store = FILE")
        db.execute("CREATE TABLE spill (image_id TEXT NOT NULL, record TEXT NOT NULL)")
        db.executemany("INSERT INTO spill VALUES (?, ?)", encoded())  # consumes the iterator lazily
        cursor = db.execute("SELECT image_id, record FROM spill ORDER BY image_id, rowid")
        for image_id, rows in itertools.groupby(cursor, key=itemgetter(0)):
            yield image_id, [json.loads(record) for _, record in rows]
