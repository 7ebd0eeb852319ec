"""The embedded default dataset: procedural chest-radiograph phantoms with small, located lesions.

Every image is a grayscale frontal chest film drawn from scratch: a body outline, two lung fields,
the heart, ribs and diaphragm domes, with per-image variation in anatomy (position, size), exposure,
blur and quantum noise. Each image holds 0-3 SMALL lesions (each at most ~3% of the image) of a
type in `LESION_TYPES`, at a site (side x zone) inside a lung field. Captions at all four levels
are derived from the true lesions, so the data is built for region-aware learning: the findings
differ between rows mostly by WHERE they are, and a model that ignores locality cannot tell
"nodule in the left upper zone" from "nodule in the right upper zone".

Conventions:
- Radiographic display: the patient's LEFT is on the image's RIGHT. "left upper zone" is the upper
  third of the lung field drawn on the right half of the image.
- Zones are the vertical thirds of each lung field. Effusions sit in the lower zone only.
- Region boxes hold every pixel the lesion changed: its drawn footprint (where it adds >= 10% of
  its peak intensity) grown by the reach of the film's blur, in pixels of the stored image, xyxy
  with exclusive x1, y1.

Also written: a VQA split in VQA-RAD's JSON format (`vqa/{split}.json`), with closed (yes/no)
and open (where / what) questions about the same images; `image_name` is `{image_id}.png`, the
image being the canonical row with that `image_id`.
"""

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from .data_schema import ShardedParquetWriter
from .negatives import make_hard_negatives

__all__ = ["LESION_TYPES", "SIDES", "ZONES", "Lesion", "generate_rows", "render_phantom", "write_synthetic_dataset"]

LESION_TYPES = ("nodule", "mass", "consolidation", "effusion", "calcification")
SIDES = ("left", "right")
ZONES = ("upper", "middle", "lower")
MAX_LESION_AREA_FRACTION = 0.03
# Sizes as fractions of the image side: (radius range, size word for the smaller/larger half).
_RADIUS = {
    "nodule": (0.022, 0.038),
    "mass": (0.045, 0.07),
    "consolidation": (0.04, 0.06),
    "effusion": (0.05, 0.075),
    "calcification": (0.01, 0.018),
}
_CONTRAST = {"nodule": 55, "mass": 60, "consolidation": 40, "effusion": 50, "calcification": 95}
_REPORT_ABSENT = {
    "nodule": "No pulmonary nodule.",
    "mass": "No mass.",
    "consolidation": "No consolidation.",
    "effusion": "No pleural effusion.",
    "calcification": "No calcification.",
}


@dataclass(frozen=True)
class Lesion:
    kind: str
    side: str
    zone: str
    size: str  # "small" | "large"
    box: tuple[int, int, int, int]  # xyxy pixels, exclusive end

    @property
    def site(self) -> str:
        return f"{self.side} {self.zone} zone"

    @property
    def caption(self) -> str:
        return f"{self.size} {self.kind} in the {self.site}"


@dataclass(frozen=True)
class _Lung:
    centre_x: float
    centre_y: float
    half_width: float
    half_height: float

    def zone_span(self, zone: str) -> tuple[float, float]:
        top = self.centre_y - self.half_height
        third = 2 * self.half_height / 3
        index = ZONES.index(zone)
        return top + index * third, top + (index + 1) * third


def _ellipse(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Soft-edged ellipse in [0, 1]."""
    distance = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1.08 - distance) / 0.16, 0.0, 1.0)


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, _Lung]]:
    """Body, lungs, heart, ribs and diaphragm; returns the film (float, 0..255) and the lung fields."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    jitter = lambda spread: rng.uniform(-spread, spread) * size  # noqa: E731
    film = np.full((size, size), rng.uniform(8, 25), dtype=np.float32)
    body_cx, body_cy = size / 2 + jitter(0.03), size * 0.55 + jitter(0.03)
    film += rng.uniform(110, 140) * _ellipse(yy, xx, body_cx, body_cy, size * rng.uniform(0.43, 0.49), size * 0.6)

    lungs = {}
    gap = size * rng.uniform(0.07, 0.1)
    half_width, half_height = size * rng.uniform(0.15, 0.18), size * rng.uniform(0.27, 0.31)
    lung_cy = size * rng.uniform(0.44, 0.5)
    # Patient's right lung is drawn on the image's LEFT (radiographic convention).
    for side, sign in (("right", -1), ("left", 1)):
        lung = _Lung(body_cx + sign * (gap + half_width), lung_cy + jitter(0.01), half_width, half_height)
        lungs[side] = lung
        field = _ellipse(yy, xx, lung.centre_x, lung.centre_y, lung.half_width, lung.half_height)
        film -= rng.uniform(70, 90) * field
        # Ribs: curved bright bands that only show over the lung field.
        spacing = size * rng.uniform(0.055, 0.07)
        curvature = rng.uniform(0.8, 1.4) / size
        rib_phase = (yy - curvature * (xx - lung.centre_x) ** 2 * -sign * 0.3 - curvature * (xx - body_cx) ** 2) / spacing
        ribs = np.clip(np.cos(2 * np.pi * rib_phase) * 2 - 1.2, 0, 1)
        film += rng.uniform(14, 24) * ribs * field

    heart_cx = body_cx + size * rng.uniform(0.04, 0.08)  # heart leans to the patient's left (image right)
    heart_cy = lung_cy + size * rng.uniform(0.13, 0.17)
    film += rng.uniform(85, 110) * _ellipse(yy, xx, heart_cx, heart_cy, size * rng.uniform(0.13, 0.17), size * 0.12)
    # Diaphragm: bright below a dome under each lung.
    for lung in lungs.values():
        dome = lung.centre_y + lung.half_height * 0.92 - ((xx - lung.centre_x) / lung.half_width) ** 2 * size * 0.03
        film += 75 * np.clip((yy - dome) / (size * 0.02), 0, 1) * (np.abs(xx - lung.centre_x) < lung.half_width * 1.1)
    return film, lungs


def _lesion_profile(
    rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, radius: float
) -> np.ndarray:
    """Intensity profile in [0, 1] of one lesion centred at (cx, cy)."""
    if kind in ("nodule", "mass"):
        return np.clip((1.0 - np.hypot(xx - cx, yy - cy) / radius) * 3, 0, 1) ** 0.8
    if kind == "calcification":
        return (np.hypot(xx - cx, yy - cy) <= radius).astype(np.float32)
    if kind == "consolidation":  # hazy, lobulated: a few overlapping gaussians
        profile = np.zeros_like(xx)
        for _ in range(4):
            ox, oy = rng.uniform(-0.5, 0.5, 2) * radius
            sigma = radius * rng.uniform(0.35, 0.5)
            profile = np.maximum(profile, np.exp(-((xx - cx - ox) ** 2 + (yy - cy - oy) ** 2) / (2 * sigma**2)))
        return profile * (profile > 0.1)
    # effusion: a meniscus filling the bottom of the lung, brightest at the costophrenic angle
    depth = np.clip((yy - (cy - radius * 0.6)) / (radius * 0.9), 0, 1)
    width = np.clip(1 - np.abs(xx - cx) / (radius * 1.6), 0, 1)
    return depth * width


def _place_lesion(
    rng: np.random.Generator, film: np.ndarray, lungs: dict[str, _Lung], kind: str, side: str, zone: str, size: int
) -> Lesion:
    low, high = _RADIUS[kind]
    radius = rng.uniform(low, high) * size
    lung = lungs[side]
    top, bottom = lung.zone_span(zone)
    if kind == "effusion":
        # above the diaphragm dome, where the fluid collects at the costophrenic angle
        cx, cy = lung.centre_x + rng.uniform(-0.2, 0.3) * lung.half_width, bottom - radius * 1.4
    else:
        margin = min(radius, (bottom - top) / 3)
        cy = rng.uniform(top + margin, bottom - margin)
        # stay inside the ellipse of the lung at that height
        reach = lung.half_width * np.sqrt(max(0.05, 1 - ((cy - lung.centre_y) / lung.half_height) ** 2)) * 0.75
        cx = lung.centre_x + rng.uniform(-reach, reach)
    # Draw only in a window around the lesion: cheap, and the profile is zero outside it anyway.
    half = int(np.ceil(radius * 2.2)) + 2
    x0, x1 = max(0, int(cx) - half), min(size, int(cx) + half + 1)
    y0, y1 = max(0, int(cy) - half), min(size, int(cy) + half + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    profile = _lesion_profile(rng, kind, yy, xx, cx, cy, radius)
    # Cap the footprint at MAX_LESION_AREA_FRACTION of the image by dropping the faintest rim.
    visible = profile >= 0.1
    limit = int(MAX_LESION_AREA_FRACTION * size * size)
    if visible.sum() > limit:
        threshold = np.sort(profile[visible])[-limit]
        profile = np.where(profile >= threshold, profile, 0)
        visible = profile >= threshold
    film[y0:y1, x0:x1] += _CONTRAST[kind] * rng.uniform(0.85, 1.15) * profile * visible
    rows, cols = np.nonzero(visible)
    box = (int(x0 + cols.min()), int(y0 + rows.min()), int(x0 + cols.max() + 1), int(y0 + rows.max() + 1))
    size_word = "small" if radius < (low + high) / 2 * size else "large"
    return Lesion(kind=kind, side=side, zone=zone, size=size_word, box=box)


def render_phantom(seed: int, index: int, size: int = 256, draw_lesions: bool = True) -> tuple[Image.Image, list[Lesion]]:
    """One film (PIL "L", `size x size`) and its lesions; a pure function of the arguments.

    Anatomy, lesions and acquisition (exposure, blur, noise) draw from separate random streams, so
    `draw_lesions=False` renders the same film's lesion-free twin (the lesions are still returned).
    """
    film, lungs = _anatomy(np.random.default_rng([seed, index, 0]), size)
    rng = np.random.default_rng([seed, index, 2])
    canvas = film if draw_lesions else film.copy()
    lesions = []
    used_sites = set()
    for _ in range(rng.choice(4, p=[0.2, 0.4, 0.25, 0.15])):
        kind = str(rng.choice(LESION_TYPES))
        side = str(rng.choice(SIDES))
        zone = "lower" if kind == "effusion" else str(rng.choice(ZONES))
        if (side, zone) in used_sites:  # one lesion per site keeps every region caption unambiguous
            continue
        used_sites.add((side, zone))
        lesions.append(_place_lesion(rng, canvas, lungs, kind, side, zone, size))
    # Exposure, then blur (the anatomy and lesions), then quantum noise on top, as on a detector.
    rng = np.random.default_rng([seed, index, 3])
    film = film * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12)
    image = Image.fromarray(np.clip(film, 0, 255).astype(np.uint8), mode="L")
    blur = float(rng.uniform(0.6, 1.6))
    image = image.filter(ImageFilter.GaussianBlur(radius=blur))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(3, 8), (size, size))
    # The blur spreads each lesion past its drawn footprint: grow the boxes by its reach (3 sigma,
    # plus a pixel for PIL's box-filter approximation) so they hold every pixel the lesion changed.
    reach = int(np.ceil(3 * blur)) + 1
    lesions = [replace(lesion, box=_grown(lesion.box, reach, size)) for lesion in lesions]
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L"), lesions


def _grown(box: tuple[int, int, int, int], margin: int, size: int) -> tuple[int, int, int, int]:
    """`box` (xyxy pixels, exclusive end) grown by `margin` on every side, clipped to a `size` image."""
    x0, y0, x1, y1 = box
    return max(0, x0 - margin), max(0, y0 - margin), min(size, x1 + margin), min(size, y1 + margin)


def _report(lesions: list[Lesion], rng: np.random.Generator) -> str:
    opening = ("There is a", "A", "Note is made of a")
    sentences = [f"{opening[rng.integers(3)]} {lesion.caption}." for lesion in lesions]
    sentences = [sentence[0].upper() + sentence[1:] for sentence in sentences]
    present = {lesion.kind for lesion in lesions}
    sentences += [_REPORT_ABSENT[kind] for kind in LESION_TYPES if kind not in present]
    sentences.append(("The heart size is normal.", "Normal cardiac silhouette.")[rng.integers(2)])
    return " ".join(sentences)


def _summary(lesions: list[Lesion]) -> str:
    kinds = sorted({lesion.kind for lesion in lesions})
    if not kinds:
        return "Normal chest X-ray."
    return f"Chest X-ray with {' and '.join(kinds)}."


def _split(index: int) -> str:
    return "validation" if index % 10 == 8 else "test" if index % 10 == 9 else "train"


def _vqa_records(image_id: str, lesions: list[Lesion], rng: np.random.Generator, first_qid: int) -> list[dict[str, Any]]:
    """Closed yes/no and open where/what questions, balanced between present and absent findings."""
    present = {lesion.kind for lesion in lesions}
    absent = [kind for kind in LESION_TYPES if kind not in present]
    questions: list[tuple[str, str, str, str]] = []  # question, answer, answer_type, question_type
    for lesion in lesions:
        questions.append((f"Is there a {lesion.kind} in the {lesion.site}?", "yes", "CLOSED", "PRES"))
        other = SIDES[1 - SIDES.index(lesion.side)]
        if not any(other_lesion.kind == lesion.kind and other_lesion.side == other for other_lesion in lesions):
            questions.append((f"Is there a {lesion.kind} in the {other} {lesion.zone} zone?", "no", "CLOSED", "POS"))
        questions.append((f"Where is the {lesion.kind}?", lesion.site, "OPEN", "POS"))
        questions.append((f"What abnormality is seen in the {lesion.site}?", lesion.kind, "OPEN", "ABN"))
    if absent:
        kind = absent[rng.integers(len(absent))]
        questions.append((f"Is there a {kind}?", "no", "CLOSED", "PRES"))
    questions.append(("Is this chest X-ray normal?", "no" if lesions else "yes", "CLOSED", "ABN"))
    return [
        {
            "qid": first_qid + offset,
            "image_name": f"{image_id}.png",
            "image_case_url": "",
            "image_organ": "CHEST",
            "evaluation": "given",
            "question": question,
            "question_rephrase": "NULL",
            "question_relation": "NULL",
            "question_frame": "NULL",
            "question_type": question_type,
            "phrase_type": "freeform",
            "qid_linked_id": f"{image_id}-{offset}",
            "answer": answer,
            "answer_type": answer_type,
        }
        for offset, (question, answer, answer_type, question_type) in enumerate(questions)
    ]


def generate_rows(n: int, seed: int = 0, image_size: int = 256) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Yield `(canonical row, VQA records)` for images 0..n-1; deterministic in (n, seed, image_size)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 pixels for lesions to be visible, got {image_size}")
    qid = 0
    for index in range(n):
        image, lesions = render_phantom(seed, index, image_size)
        text_rng = np.random.default_rng([seed, index, 1])
        image_id = f"synth-{seed}-{index:06d}"
        report = _report(lesions, text_rng)
        row = {
            "image": image,
            "image_id": image_id,
            "modality": "chest_xray",
            "summary_caption": _summary(lesions),
            "report_caption": report,
            "regions": [{"bbox": list(lesion.box), "caption": lesion.caption, "label": lesion.kind} for lesion in lesions],
            "negative_captions": make_hard_negatives(report, num=3, seed=seed),
            "labels": sorted({lesion.kind for lesion in lesions}) or ["No finding"],
            "split": _split(index),
        }
        records = _vqa_records(image_id, lesions, text_rng, qid)
        qid += len(records)
        yield row, records


def write_synthetic_dataset(output_dir: str | Path, n: int, seed: int = 0, image_size: int = 256,
                            rows_per_shard: int = 1000) -> dict[str, Any]:
    """Write `n` synthetic rows as canonical parquet shards plus `vqa/{split}.json`; returns a summary."""
    output_dir = Path(output_dir)
    start = time.perf_counter()
    vqa: dict[str, list[dict[str, Any]]] = {}
    with ShardedParquetWriter(output_dir, rows_per_shard) as writer:
        for row, records in generate_rows(n, seed, image_size):
            writer.write(row)
            vqa.setdefault(row["split"], []).extend(records)
    (output_dir / "vqa").mkdir(exist_ok=True)
    for split, records in vqa.items():
        (output_dir / "vqa" / f"{split}.json").write_text(json.dumps(records, indent=1))
    return {
        "rows": writer.counts,
        "vqa_questions": {split: len(records) for split, records in vqa.items()},
        "seconds": round(time.perf_counter() - start, 2),
        "output_dir": str(output_dir),
    }
