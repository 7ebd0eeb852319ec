"""Checkpoint integrity: a completion marker, written last, that records the size and SHA-256 of every
file of the checkpoint; `--resume` verifies it and falls back to the newest intact checkpoint.

A kill while saving leaves a folder without the marker; flipped or truncated bytes afterwards (a disk
or copy fault) leave a marker whose records no longer match. Either way the folder is skipped, with
the files that failed named, and the previous intact checkpoint is used. Markers written before
checksums were recorded (only `global_step`) are trusted as they are, with a warning.
"""

import json
import logging
import os
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from regionmed_clip.data.fingerprints import file_sha256

__all__ = ["CHECKPOINT_COMPLETE", "checkpoint_step", "latest_intact_checkpoint", "verify_checkpoint",
           "write_completion_marker"]

logger = logging.getLogger(__name__)

CHECKPOINT_COMPLETE = "CHECKPOINT_COMPLETE"


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*")
                  if path.is_file() and not path.name.startswith(CHECKPOINT_COMPLETE))


def write_completion_marker(folder: Path, global_step: int) -> None:
    """Record every file of `folder` (size, SHA-256) in its marker, atomically (temp file + rename)."""
    files = {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
             for path in _checkpoint_files(folder)}
    partial = folder / f"{CHECKPOINT_COMPLETE}.partial"
    partial.write_text(json.dumps({"global_step": global_step, "files": files}, indent=1))
    os.replace(partial, folder / CHECKPOINT_COMPLETE)


def verify_checkpoint(folder: Path) -> list[str]:
    """What is wrong with `folder` as a checkpoint, one line per file: `[]` when it is intact."""
    marker = folder / CHECKPOINT_COMPLETE
    if not marker.is_file():
        return [f"no {CHECKPOINT_COMPLETE} marker (the run stopped while saving it)"]
    try:
        record = json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        return [f"{CHECKPOINT_COMPLETE} is unreadable ({error})"]
    files = record.get("files") if isinstance(record, dict) else None
    if files is None:
        logger.warning("%s: its marker records no checksums (an older run): trusted without verification", folder)
        return []
    problems = []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (size := path.stat().st_size) != expected["size"]:
            problems.append(f"{name}: {size} bytes where {expected['size']} were written")
        elif file_sha256(path) != expected["sha256"]:
            problems.append(f"{name}: contents changed since it was written (SHA-256 mismatch)")
    return problems


def checkpoint_step(folder: Path) -> int | None:
    """N of a `checkpoint-N` folder, else None."""
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", folder.name)
    return int(match.group(1)) if match else None


def latest_intact_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step `checkpoint-N` folder that verifies, or None; every newer one that does not is
    logged with the files that failed."""
    folders = [(step, path) for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
               if path.is_dir() and (step := checkpoint_step(path)) is not None]
    for _, folder in sorted(folders, reverse=True):
        problems = verify_checkpoint(folder)
        if not problems:
            return folder
        logger.warning("skipping %s: %s", folder, "; ".join(problems))
    return None
