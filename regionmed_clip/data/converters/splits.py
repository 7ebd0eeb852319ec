"""Split names: a split as a dataset spells it ("val", "validate") to its canonical name, and the split a file
name (`instances_val2017.json`) or a folder named like a split gives."""

import re
from pathlib import Path

__all__ = ["_split_from_path", "_split_name"]

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validate": "validation",
    "validation": "validation",
    "test": "test",
}
_SPLIT_TOKEN = re.compile(r"(?<![a-z])(training|train|validation|validate|valid|val|test)(?![a-z])")


def _split_name(value: str) -> str:
    """A split as a dataset spells it ("val") -> the canonical name; unknown names pass through (and fail later)."""
    return _SPLIT_ALIASES.get(value.strip().lower(), value)


def _split_from_path(path: Path) -> str:
    """The split a file name (as a token: `instances_val2017.json`, `validate.json`) or, nearest first, a folder
    named exactly like a split (`data/test/radiology/captions.txt`) names; "train" when none does."""
    match = _SPLIT_TOKEN.search(path.stem.lower())
    if match:
        return _SPLIT_ALIASES[match.group(1)]
    for part in reversed(path.parent.parts):
        if part.lower() in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[part.lower()]
    return "train"
