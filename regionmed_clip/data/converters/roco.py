"""ROCO: captions.txt (or a folder searched for captions.txt), dlinks.txt beside it; images
`{PMCid}_{name}|{name}|{ROCO_xxxxx}.jpg|.png` in `images/` beside captions.txt."""

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .captions import _sentence
from .inputs import _grouped, _text_lines
from .rows import SkipCounter, _converter, _Draft, _listed_once
from .splits import _split_from_path

__all__ = ["_roco"]

logger = logging.getLogger(__name__)

_ROCO_ARCHIVE = re.compile(r"([^/\s]+)\.tar\.gz\b")


def _roco_dlinks(path: Path) -> dict[str, tuple[str | None, str]]:
    """ROCO id -> (archive id, image file name) from a dlinks.txt; {} when the file is absent.

    Lines are "ROCO_xxxxx<TAB>wget -r ftp://.../PMCxxxx.tar.gz -P /path/to/Dir<TAB>name.jpg": the archive id is the
    archive's file name without ".tar.gz" (as the release's scripts/fetch.py takes it), the image name the last
    column. A line without an image name is ignored (its caption row then falls back to the id-named files).
    """
    links: dict[str, tuple[str | None, str]] = {}
    if not path.is_file():
        return links
    for number, line in _text_lines(path):
        columns = line.rstrip("\r\n").split("\t")
        name, image = columns[0].strip(), columns[-1].strip()
        if len(columns) < 2 or not (name and image):
            if line.strip():
                logger.debug("ignored dlinks line %s:%d", path, number)
            continue
        archive = _ROCO_ARCHIVE.search(columns[1]) if len(columns) > 2 else None
        links[name] = (archive.group(1) if archive else None, image)
    return links


def _roco_candidates(name: str, link: tuple[str | None, str] | None, folder: Path) -> list[Path]:
    """Where ROCO image `name` may be: fetch.py's "{PMCid}_{image}", the bare dlinks name, then "{name}.jpg|.png"."""
    candidates = []
    if link is not None:
        archive, image = link
        if archive:
            candidates.append(folder / f"{archive}_{image}")
        candidates.append(folder / image)
    return candidates + [folder / f"{name}.jpg", folder / f"{name}.png"]


@_converter
def _roco_drafts(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, given_images: Path | None = None
) -> Iterator[_Draft]:
    """ROCO drafts; `given_images` is the images folder the caller passed (None: each captions file's `images/`)."""
    files = sorted(input_path.rglob("captions.txt")) if input_path.is_dir() else [input_path]

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for path in files:
            split = _split_from_path(path)
            modality = "non_radiology" if "non-radiology" in path.parts else "radiology"
            folder = given_images if given_images is not None else path.parent / "images"
            links = _roco_dlinks(path.parent / "dlinks.txt")  # one id -> name dict per captions file
            for number, line in _text_lines(path):
                if not line.strip():
                    continue
                name, tab, caption = line.partition("\t")
                name, caption = name.strip(), " ".join(caption.split())  # lines are "ROCO_00001\t caption"
                if not (tab and name and caption):
                    skipped.skip_row("malformed captions line", f"{path}:{number}")
                    continue
                candidates = [str(candidate) for candidate in _roco_candidates(name, links.get(name), folder)]
                yield name, {"split": split, "modality": modality, "caption": caption, "candidates": candidates}

    # Grouped by id, so that an id listed twice is found and follows the one rule of `_listed_once`.
    for name, group in _grouped(records(), skipped):
        record = _listed_once(group, "ROCO id", name, skipped.skip_row)
        if record is None:
            continue
        caption = record["caption"]
        yield _Draft(
            name,
            [Path(candidate) for candidate in record["candidates"]],
            split=record["split"],
            modality=record["modality"],
            summary=_sentence(re.split(r"(?<=[.!?])\s", caption, maxsplit=1)[0]),
            report=caption,
        )


def _roco(input_path: Path, images_dir: Path | None, **options: Any) -> Iterator[dict[str, Any]]:
    """ROCO captions.txt (or every captions.txt under a folder): one row per line, no regions, no labels.

    Layout of the release (razorx89/roco-dataset): `data/{train,validation,test}/{radiology,non-radiology}/` holds
    `captions.txt` ("ROCO_xxxxx<TAB> caption") and `dlinks.txt` (id, download command, image name); its
    scripts/fetch.py saves each image as `images/{PMCid}_{image name}` beside them. An image is looked for in
    `images_dir` when given, else in the captions file's own `images/` folder, as `{PMCid}_{name}`, then `{name}`
    (from the sibling dlinks.txt, when there is one), then `{ROCO_id}.jpg|.png` (mirrors that rename by id); a row
    whose image is in none of them is skipped as "missing image" (the debug log lists the paths tried). An id listed
    twice is a duplicate (same caption, split and image: the first kept) or, when the lines disagree, left out.

    Split from the path; modality "radiology" ("non_radiology" under a `non-radiology` folder).
    """
    return _roco_drafts(input_path, images_dir, given_images=images_dir, **options)


_roco.forwards_to = _roco_drafts  # type: ignore[attr-defined]  # what `check_options` reads
