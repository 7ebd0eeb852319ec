"""One file hash and one dataset fingerprint, for everything that records what it read: a training run
(resumed only on the same data contents), an evaluation results record, checkpoint completion markers."""

import hashlib
from pathlib import Path
from typing import Any

__all__ = ["dataset_fingerprint", "file_sha256", "split_files"]

_HASH_CHUNK = 8 * 2**20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 8 MiB chunks (a multi-GB checkpoint never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The files one split is read from, in name order: its parquet shards (`SPLIT-*.parquet`), else every
    file of its `save_to_disk` folder (`DATA_DIR/SPLIT/`, or `DATA_DIR` itself for a single saved split)."""
    data_dir = Path(data_dir)
    shards = sorted(data_dir.glob(f"{split}-*.parquet"))
    if shards:
        return shards
    folder = data_dir / split if (data_dir / split).is_dir() else data_dir
    return sorted(path for path in folder.rglob("*") if path.is_file())


def dataset_fingerprint(data_dir: str | Path, split: str) -> dict[str, Any]:
    """`{"name", "path", "split", "files": [{"name", "bytes", "sha256"}], "sha256", "revision"}`.

    `sha256` covers every file's name (relative to `data_dir`) and contents, so it changes when the data
    does and not when the folder moves; `revision` is the text of a `REVISION` file in the folder when
    there is one (converters record the source release there)."""
    data_dir = Path(data_dir)
    files = [{"name": path.relative_to(data_dir).as_posix(), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
             for path in split_files(data_dir, split)]
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file['name']}\0{file['sha256']}\0".encode())
    revision_file = data_dir / "REVISION"
    return {
        "name": data_dir.resolve().name,
        "path": str(data_dir.resolve()),
        "split": split,
        "files": files,
        "sha256": digest.hexdigest(),
        "revision": revision_file.read_text().strip() if revision_file.is_file() else None,
    }
