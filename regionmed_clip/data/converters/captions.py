"""Caption templates every format shares: modality names, class names as phrases inside a sentence, and the
summary, report and region-caption templates of the package docstring ("Chest X-ray with pleural effusion.",
"The liver and the spleen are seen.", "nodule in the right upper zone"), with the `CXR` modality and the
`NO_FINDING` label they know."""

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CXR",
    "NO_FINDING",
    "_default_report",
    "_modality_name",
    "_organ_captions",
    "_position_caption",
    "_sentence",
    "_summary",
    "_unique",
]

CXR = "chest_xray"
NO_FINDING = "No finding"
_MODALITY_NAMES = {
    CXR: "Chest X-ray",
    "xray": "X-ray",
    "ct": "CT scan",
    "mri": "MRI scan",
    "radiology": "Radiology image",
}
_NO_FINDING_LABELS = frozenset({"no finding", "normal"})
# Dataset class names that do not read as a finding phrase once lower-cased.
_LABEL_PHRASES = {
    "No Lung Opacity / Not Normal": "no lung opacity but another abnormality",
    "Pleural Other": "another pleural abnormality",
}


def _unique(values: Iterable[str]) -> list[str]:
    """Distinct non-empty values in first-seen order."""
    return [value for value in dict.fromkeys(values) if value]


def _phrase(label: str) -> str:
    """A class name as it reads inside a sentence; acronyms (ILD) keep their case."""
    return _LABEL_PHRASES.get(label, label if label.isupper() else label.lower())


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else f"{text}."


def _join(words: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _modality_name(modality: str) -> str:
    return _MODALITY_NAMES.get(modality, "Medical image")


def _is_no_finding(label: str) -> bool:
    return label.lower() in _NO_FINDING_LABELS


def _summary(modality: str, labels: Sequence[str]) -> str:
    findings = [_phrase(label) for label in labels if not _is_no_finding(label)]
    return f"{_modality_name(modality)} with {_join(findings) if findings else 'no finding'}."


def _organ_captions(modality: str, location: str, organs: Sequence[str] = ()) -> tuple[str, str | None]:
    """(summary, report) of an image known by the body part it shows: "{Modality} of the {location}." and "The
    liver and the spleen are seen." (the `organs`), else "The {location} is seen."; report None if neither is known."""
    seen = [f"the {_phrase(name)}" for name in organs] or ([f"the {location}"] if location else [])
    summary = f"{_modality_name(modality)} of the {location}." if location else f"{_modality_name(modality)}."
    # "... is/are seen." reads as a statement the negation rules can flip ("is not seen")
    report = _sentence(f"{_join(seen)} {'are' if len(seen) > 1 else 'is'} seen") if seen else None
    return summary, report


def _default_report(regions: Sequence[dict[str, Any]], labels: Sequence[str], summary: str) -> str:
    """The region captions as sentences; a fixed sentence for a no-finding image; else the summary."""
    if regions:
        return " ".join(_unique(_sentence(region["caption"]) for region in regions))
    if labels and all(_is_no_finding(label) for label in labels):
        return "No abnormality is seen."
    return summary


def _position_caption(label: str, bbox: Sequence[float], size: tuple[int, int], modality: str) -> str:
    """Where the box centre lies: lung zones for chest X-rays, a 3x3 grid of the image otherwise."""
    cx = (bbox[0] + bbox[2]) / 2 / size[0]
    cy = (bbox[1] + bbox[3]) / 2 / size[1]
    vertical = ("upper", "middle", "lower")[min(int(cy * 3), 2)]
    if modality == CXR:
        # A frontal film shows the patient's right on the image's left.
        return f"{_phrase(label)} in the {'right' if cx < 0.5 else 'left'} {vertical} zone"
    horizontal = ("left", "centre", "right")[min(int(cx * 3), 2)]
    return f"{_phrase(label)} in the {vertical} {horizontal} of the image"
