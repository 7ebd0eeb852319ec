"""The embedded default dataset: procedural chest-radiograph phantoms with small, located lesions.

Every image is a grayscale frontal chest film drawn from scratch: a body outline, two lung fields,
the heart, ribs and diaphragm domes, with per-image variation in anatomy (position, size), exposure,
blur and quantum noise. Each image holds 0-3 SMALL lesions (each at most ~3% of the image) of a
type in `LESION_TYPES`, at a site (side x zone) inside a lung field. Captions at all four levels
are derived from the true lesions, so the data is built for region-aware learning: the findings
differ between rows mostly by WHERE they are, and a model that ignores locality cannot tell
"nodule in the left upper zone" from "nodule in the right upper zone".

It is also built so that a global view alone is not enough to tell WHAT a lesion is. Two pairs of
types are look-alikes (`LOOKALIKE_TYPES`): they share the size range, envelope and integrated
brightness, so in a downsampled global view (measured with the 256 px film resized to 64 px; the
tiny preset's 128 px view halves the resolution) they are nearly the same blob, and differ only in
fine structure that a native-resolution region crop shows:
- "nodule": a solid, smooth disc; "cavity": the same envelope with a lucent (dark) centre inside a
  bright wall, scaled per lesion to the nodule's integrated brightness.
- "mass": a solid, smooth disc; "consolidation": the same envelope and mean intensity, but mottled
  (5-7 px plane waves) and crossed by dark branching air-bronchogram lines (~1-2 px wide).

Wording varies so that memorised strings do not work: region captions use one of
`REGION_TEMPLATES`, report sentences one of `REPORT_TEMPLATES`, with size synonyms (`SIZE_WORDS`),
openings and the order of the negative statements drawn from the row's text rng. Every caption or
report sentence about a lesion names its side (left/right), zone (upper/middle/lower) and type
literally, so rule-based negatives (laterality, location, finding) apply to all of them.

Conventions:
- Radiographic display: the patient's LEFT is on the image's RIGHT. "left upper zone" is the upper
  third of the lung field drawn on the right half of the image.
- Zones are the vertical thirds of each lung field. Effusions sit in the lower zone only.
- One lesion per site, at most one lesion of a type per side, and never the same type at the
  mirror site (same zone, other side): so every side-, zone- or type-swapped region caption below is
  false for the image.
- Region boxes hold every pixel the lesion changed: its drawn footprint (where it adds >= 10% of
  its peak intensity) grown by the reach of the film's blur, in pixels of the stored image, xyxy
  with exclusive x1, y1.

Also written, next to the parquet shards:
- `vqa/{split}.json`: a VQA split in VQA-RAD's JSON format, with closed (yes/no) and open
  (where / what) questions about the same images; `image_name` is `{image_id}.png`, the image being
  the canonical row with that `image_id`.
- `region_negatives/{split}.json`: per region, three negatives of its caption in the SAME template
  with exactly one attribute changed (side swapped; zone moved to one of the other two; type swapped
  to its look-alike partner, or to a random other type when it has none). A JSON list of
  `{"image_id", "region_index" (into the row's regions), "caption", "label", "side", "zone",
  "negatives": {"side", "zone", "type"}}`.

The dataset is written through `data_schema.dataset_output`: into a hidden staging folder beside the output,
renamed to the output only once complete; a staging folder that a killed run left behind is removed by the next
run that writes the same output.
"""

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from regionmed_clip.data.schema import ShardedParquetWriter, dataset_output, write_provenance

from .negatives import make_hard_negatives

__all__ = [
    "LESION_TYPES",
    "LOOKALIKE_TYPES",
    "REGION_NEGATIVES_DIR",
    "REGION_TEMPLATES",
    "REPORT_TEMPLATES",
    "SIDES",
    "SIZE_WORDS",
    "ZONES",
    "Lesion",
    "generate_rows",
    "parse_region_caption",
    "region_negatives",
    "render_lesion_patch",
    "render_phantom",
    "write_synthetic_dataset",
]

LESION_TYPES = ("nodule", "cavity", "mass", "consolidation", "effusion", "calcification")
# The type-swap partner: same size range, envelope and brightness, different fine structure.
LOOKALIKE_TYPES = {"nodule": "cavity", "cavity": "nodule", "mass": "consolidation", "consolidation": "mass"}
SIDES = ("left", "right")
ZONES = ("upper", "middle", "lower")
MAX_LESION_AREA_FRACTION = 0.03
REGION_NEGATIVES_DIR = "region_negatives"
# Sizes as fractions of the image side: radius range; the size word is "small" below its midpoint.
_RADIUS = {
    "nodule": (0.022, 0.038),
    "cavity": (0.022, 0.038),
    "mass": (0.045, 0.07),
    "consolidation": (0.045, 0.07),
    "effusion": (0.05, 0.075),
    "calcification": (0.01, 0.018),
}
_CONTRAST = {"nodule": 55, "cavity": 55, "mass": 60, "consolidation": 60, "effusion": 50, "calcification": 95}
# Region-caption templates; every one names size, type, side and zone (all literal words).
REGION_TEMPLATES = (
    "{size} {kind} in the {side} {zone} zone",
    "{side} {zone} zone: {size} {kind}",
    "a {size} {kind} projects over the {zone} zone of the {side} lung",
    "{size} {side} {zone} zone {kind}",
    "{size} {kind} seen in the {zone} zone of the {side} lung",
    "{side} lung, {zone} zone: {size} {kind}",
)
# Report sentences about one lesion ({Size}/{Side}: capitalised at the start of a sentence).
REPORT_TEMPLATES = (
    "There is a {size} {kind} in the {side} {zone} zone.",
    "A {size} {kind} is seen in the {side} {zone} zone.",
    "Note is made of a {size} {kind} in the {side} {zone} zone.",
    "{Size} {kind} in the {side} {zone} zone.",
    "The {side} {zone} zone shows a {size} {kind}.",
    "A {size} {kind} projects over the {zone} zone of the {side} lung.",
    "{Side} {zone} zone: {size} {kind}.",
    "There is a {size} {side} {zone} zone {kind}.",
)
# Size word -> the words a caption may use for it (the first twice as likely).
SIZE_WORDS = {"small": ("small", "small", "tiny"), "large": ("large", "large", "sizeable")}
_OPENINGS = ("", "", "Frontal chest radiograph. ", "Findings: ", "PA chest film. ")
_REPORT_ABSENT = {
    "nodule": ("No pulmonary nodule.", "No nodule is seen."),
    "cavity": ("No cavity.", "No cavity is seen."),
    "mass": ("No mass.", "No mass is identified."),
    "consolidation": ("No consolidation.", "No focal consolidation."),
    "effusion": ("No pleural effusion.", "No effusion."),
    "calcification": ("No calcification.", "No calcification is seen."),
}
_HEART = ("The heart size is normal.", "Normal cardiac silhouette.", "Heart size is within normal limits.")


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

    def caption(self, template: int = 0, size_word: str | None = None) -> str:
        """The region caption in `REGION_TEMPLATES[template]`; `size_word` defaults to `self.size`."""
        return REGION_TEMPLATES[template].format(
            size=size_word or self.size, kind=self.kind, side=self.side, zone=self.zone
        )


def _draw_wording(lesion: Lesion, rng: np.random.Generator) -> tuple[int, str]:
    """A region-caption template index and a size word for `lesion`, drawn from `rng`."""
    words = SIZE_WORDS[lesion.size]
    return int(rng.integers(len(REGION_TEMPLATES))), str(words[rng.integers(len(words))])


def region_negatives(lesion: Lesion, template: int, rng: np.random.Generator,
                     size_word: str | None = None) -> dict[str, str]:
    """Three negatives of `lesion.caption(template, size_word)`, each with exactly one attribute changed.

    "side": left <-> right; "zone": one of the two other zones, drawn from `rng`; "type": the
    `LOOKALIKE_TYPES` partner, or (for types without one) another of `LESION_TYPES` drawn from `rng`.
    """
    other_side = SIDES[1 - SIDES.index(lesion.side)]
    zones = [zone for zone in ZONES if zone != lesion.zone]
    other_zone = zones[rng.integers(len(zones))]
    if lesion.kind in LOOKALIKE_TYPES:
        other_kind = LOOKALIKE_TYPES[lesion.kind]
    else:
        kinds = [kind for kind in LESION_TYPES if kind != lesion.kind]
        other_kind = kinds[rng.integers(len(kinds))]
    return {
        "side": replace(lesion, side=other_side).caption(template, size_word),
        "zone": replace(lesion, zone=other_zone).caption(template, size_word),
        "type": replace(lesion, kind=other_kind).caption(template, size_word),
    }


def _template_pattern(template: str) -> re.Pattern[str]:
    fields = {
        "size": "(?P<size>" + "|".join(sorted({w for ws in SIZE_WORDS.values() for w in ws})) + ")",
        "kind": "(?P<kind>" + "|".join(LESION_TYPES) + ")",
        "side": "(?P<side>" + "|".join(SIDES) + ")",
        "zone": "(?P<zone>" + "|".join(ZONES) + ")",
    }
    pattern = re.escape(template)
    for name, group in fields.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


_REGION_PATTERNS = [_template_pattern(template) for template in REGION_TEMPLATES]


def parse_region_caption(caption: str) -> dict[str, Any] | None:
    """`{"template", "size", "kind", "side", "zone"}` of a region caption (or a negative), or None."""
    for index, pattern in enumerate(_REGION_PATTERNS):
        match = pattern.match(caption)
        if match:
            return {"template": index, **match.groupdict()}
    return None


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


def _disc(distance: np.ndarray, radius: float) -> np.ndarray:
    """The solid, smooth disc of a nodule or mass: flat top, soft rim, zero beyond `radius`."""
    return np.clip((1.0 - distance / radius) * 3, 0, 1) ** 0.8


def _segment_distance(yy: np.ndarray, xx: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    direction = end - start
    t = np.clip(((xx - start[0]) * direction[0] + (yy - start[1]) * direction[1]) / max(direction @ direction, 1e-6), 0, 1)
    return np.hypot(xx - start[0] - t * direction[0], yy - start[1] - t * direction[1])


def _lesion_profile(
    rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, radius: float,
    size: int,
) -> np.ndarray:
    """Intensity profile (>= 0, ~1 at its solid part) of one lesion centred at (cx, cy) on a `size` film."""
    distance = np.hypot(xx - cx, yy - cy)
    if kind in ("nodule", "mass"):
        return _disc(distance, radius)
    if kind == "cavity":
        # The nodule's envelope (a little tighter) with a lucent centre (radius 0.38 of the lesion's,
        # 2-4 px) inside a bright wall, scaled to the nodule's integrated brightness: resolved in a
        # crop, about one pixel in a 64 px view.
        solid = _disc(distance, radius)
        wall = np.clip((distance / radius - 0.38) / 0.1, 0, 1)
        profile = _disc(distance, 0.85 * radius) * (0.15 + 0.85 * wall)
        return profile * (solid.sum() / max(float(profile.sum()), 1e-6))
    if kind == "consolidation":
        # The mass's envelope and mean intensity, mottled (plane waves of 5-7 px, zero mean) and crossed
        # by dark branching air-bronchogram lines ~1-2 px wide. The mottle's wavelength is above what
        # the film's blur erases (sigma up to 1.6 px wiped out the 2.5-4 px mottle of an earlier
        # version: a label-supervised CNN on the crops told mass from consolidation 0.67 of the time)
        # and resolved in a 32 px crop of a mass (~1.5 px per crop pixel), but below a 64 px view's
        # resolution (4 px per pixel).
        solid = _disc(distance, radius)
        scale = size / 256
        mottle = np.zeros_like(xx)
        for _ in range(5):
            wavelength = rng.uniform(5.0, 7.0) * scale
            angle, phase = rng.uniform(0, 2 * np.pi, 2)
            mottle += np.cos(2 * np.pi / wavelength * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        nearest = np.full_like(xx, np.inf)  # distance to the nearest air-bronchogram segment
        for _ in range(int(rng.integers(2, 4))):
            angle = rng.uniform(0, 2 * np.pi)
            start = np.array([cx + 0.95 * radius * np.cos(angle), cy + 0.95 * radius * np.sin(angle)])
            fork = np.array([cx, cy]) + rng.uniform(-0.25, 0.25, 2) * radius
            segments = [(start, fork)]
            for turn in (-1, 1):
                branch = angle + np.pi + turn * rng.uniform(0.3, 0.7)
                segments.append((fork, fork + 0.7 * radius * np.array([np.cos(branch), np.sin(branch)])))
            for a, b in segments:
                nearest = np.minimum(nearest, _segment_distance(yy, xx, a, b))
        # A dark lumen between brighter walls, zero-mean across the line, so a coarse view averages it out.
        width = 0.6 * max(scale, 0.5)
        lines = np.exp(-((nearest / width) ** 2) / 2) - 0.5 * np.exp(-((nearest / (2 * width)) ** 2) / 2)
        profile = solid * np.clip(1 + 0.8 * mottle / np.sqrt(2.5), 0, None) * np.clip(1 - 1.4 * lines, 0, None)
        return profile * (solid.sum() / max(float(profile.sum()), 1e-6))
    if kind == "calcification":
        return (distance <= radius).astype(np.float32)
    # effusion: a meniscus filling the bottom of the lung, brightest at the costophrenic angle
    depth = np.clip((yy - (cy - radius * 0.6)) / (radius * 0.9), 0, 1)
    width = np.clip(1 - np.abs(xx - cx) / (radius * 1.6), 0, 1)
    return depth * width


def _draw_lesion(rng: np.random.Generator, canvas: np.ndarray, kind: str, cx: float, cy: float, radius: float,
                 size: int) -> tuple[int, int, int, int]:
    """Add one lesion to `canvas` (a `size` film or a patch of one); returns its footprint box (xyxy)."""
    gain = rng.uniform(0.85, 1.15)
    texture_rng = np.random.default_rng(rng.integers(2**32))  # drawn for every type: paired renders stay aligned
    height, width = canvas.shape
    # Draw only in a window around the lesion: cheap, and the profile is zero outside it anyway.
    half = int(np.ceil(radius * 2.2)) + 2
    x0, x1 = max(0, int(cx) - half), min(width, int(cx) + half + 1)
    y0, y1 = max(0, int(cy) - half), min(height, int(cy) + half + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    profile = _lesion_profile(texture_rng, kind, yy, xx, cx, cy, radius, size)
    peak = float(profile.max())
    if peak <= 0:  # a lesion smaller than a pixel on a tiny film: keep the pixel nearest its centre
        profile = np.zeros_like(xx)
        profile[min(max(int(round(cy)) - y0, 0), y1 - y0 - 1), min(max(int(round(cx)) - x0, 0), x1 - x0 - 1)] = 1.0
        peak = 1.0
    # Footprint: where the lesion adds >= 10% of its solid level (profiles are ~1 there); capped at
    # MAX_LESION_AREA_FRACTION of the image by dropping the faintest part.
    visible = profile >= 0.1 * min(peak, 1.0)
    limit = max(1, int(MAX_LESION_AREA_FRACTION * size * size))
    if visible.sum() > limit:
        threshold = np.sort(profile[visible])[-limit]
        visible = profile >= threshold
    canvas[y0:y1, x0:x1] += _CONTRAST[kind] * gain * profile * visible
    rows, cols = np.nonzero(visible)
    return int(x0 + cols.min()), int(y0 + rows.min()), int(x0 + cols.max() + 1), int(y0 + rows.max() + 1)


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
    box = _draw_lesion(rng, film, kind, cx, cy, max(radius, 1.0), size)
    size_word = "small" if radius < (low + high) / 2 * size else "large"
    return Lesion(kind=kind, side=side, zone=zone, size=size_word, box=box)


def _acquire(film: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, float]:
    """Exposure, then blur (the anatomy and lesions), then quantum noise on top, as on a detector."""
    film = film * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12)
    image = Image.fromarray(np.clip(film, 0, 255).astype(np.uint8), mode="L")
    blur = float(rng.uniform(0.6, 1.6))
    image = image.filter(ImageFilter.GaussianBlur(radius=blur))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(3, 8), film.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L"), blur


def render_phantom(seed: int, index: int, size: int = 256, draw_lesions: bool = True) -> tuple[Image.Image, list[Lesion]]:
    """One film (PIL "L", `size x size`) and its lesions; a pure function of the arguments.

    Anatomy, lesions and acquisition (exposure, blur, noise) draw from separate random streams, so
    `draw_lesions=False` renders the same film's lesion-free twin (the lesions are still returned).
    """
    film, lungs = _anatomy(np.random.default_rng([seed, index, 0]), size)
    rng = np.random.default_rng([seed, index, 2])
    canvas = film if draw_lesions else film.copy()
    lesions = []
    sites: dict[tuple[str, str], str] = {}
    for _ in range(rng.choice(4, p=[0.2, 0.4, 0.25, 0.15])):
        kind = str(rng.choice(LESION_TYPES))
        side = str(rng.choice(SIDES))
        zone = "lower" if kind == "effusion" else str(rng.choice(ZONES))
        mirror = (SIDES[1 - SIDES.index(side)], zone)
        # One lesion per site keeps every region caption unambiguous; no second lesion of a type on
        # a side or at the mirror site keeps every side/zone-swapped caption false for the image.
        if (side, zone) in sites or sites.get(mirror) == kind or any(
            sites.get((side, other)) == kind for other in ZONES
        ):
            continue
        sites[(side, zone)] = kind
        lesions.append(_place_lesion(rng, canvas, lungs, kind, side, zone, size))
    image, blur = _acquire(film, np.random.default_rng([seed, index, 3]))
    # The blur spreads each lesion past its drawn footprint: grow the boxes by its reach (3 sigma,
    # plus a pixel for PIL's box-filter approximation) so they hold every pixel the lesion changed.
    reach = int(np.ceil(3 * blur)) + 1
    lesions = [replace(lesion, box=_grown(lesion.box, reach, size)) for lesion in lesions]
    return image, lesions


def render_lesion_patch(kind: str, seed: int, index: int = 0, size: int = 256,
                        patch: int = 64) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One lesion of `kind` alone on a flat lung-field patch of a `size` film, through the film's acquisition.

    Returns the `patch x patch` image (float32, 0..255, after exposure, blur and noise) and the
    lesion's (cx, cy, radius) in patch pixels. The draws do not depend on `kind`, so two kinds rendered
    with the same (seed, index) share radius, centre, brightness, blur and noise: a paired comparison
    (what `tests/test_synthetic.py` measures the look-alike pairs with).
    """
    rng = np.random.default_rng([seed, index, 4])
    low, high = _RADIUS[kind]
    radius = max(float(rng.uniform(0, 1)) * (high - low) * size + low * size, 1.0)
    cx, cy = patch / 2 + rng.uniform(-2, 2, 2)
    canvas = np.full((patch, patch), 70.0, dtype=np.float32)
    _draw_lesion(rng, canvas, kind, float(cx), float(cy), radius, size)
    image, _ = _acquire(canvas, np.random.default_rng([seed, index, 5]))
    return np.asarray(image, dtype=np.float32), (float(cx), float(cy), radius)


def _grown(box: tuple[int, int, int, int], margin: int, size: int) -> tuple[int, int, int, int]:
    """`box` (xyxy pixels, exclusive end) grown by `margin` on every side, clipped to a `size` image."""
    x0, y0, x1, y1 = box
    return max(0, x0 - margin), max(0, y0 - margin), min(size, x1 + margin), min(size, y1 + margin)


def _report(lesions: list[Lesion], rng: np.random.Generator) -> str:
    """A report: an optional opening, one sentence per lesion, the absent findings, the heart."""
    sentences = []
    for lesion in lesions:
        words = SIZE_WORDS[lesion.size]
        size_word = str(words[rng.integers(len(words))])
        template = REPORT_TEMPLATES[rng.integers(len(REPORT_TEMPLATES))]
        sentences.append(template.format(size=size_word, Size=size_word.capitalize(), kind=lesion.kind,
                                         side=lesion.side, Side=lesion.side.capitalize(), zone=lesion.zone))
    present = {lesion.kind for lesion in lesions}
    absent = [kind for kind in LESION_TYPES if kind not in present]
    absent = [absent[i] for i in rng.permutation(len(absent))]
    sentences += [_REPORT_ABSENT[kind][rng.integers(2)] for kind in absent]
    sentences.append(_HEART[rng.integers(len(_HEART))])
    return _OPENINGS[rng.integers(len(_OPENINGS))] + " ".join(sentences)


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


def _generate(n: int, seed: int, image_size: int) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]]:
    """`(canonical row, VQA records, region-negative records)` for images 0..n-1."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 pixels for lesions to be visible, got {image_size}")
    qid = 0
    for index in range(n):
        image, lesions = render_phantom(seed, index, image_size)
        text_rng = np.random.default_rng([seed, index, 1])
        image_id = f"synth-{seed}-{index:06d}"
        wordings = [_draw_wording(lesion, text_rng) for lesion in lesions]
        captions = [lesion.caption(*wording) for lesion, wording in zip(lesions, wordings, strict=True)]
        negatives = [
            {
                "image_id": image_id,
                "region_index": region_index,
                "caption": caption,
                "label": lesion.kind,
                "side": lesion.side,
                "zone": lesion.zone,
                "negatives": region_negatives(lesion, template, text_rng, size_word),
            }
            for region_index, (lesion, caption, (template, size_word)) in enumerate(
                zip(lesions, captions, wordings, strict=True))
        ]
        report = _report(lesions, text_rng)
        row = {
            "image": image,
            "image_id": image_id,
            "modality": "chest_xray",
            "summary_caption": _summary(lesions),
            "report_caption": report,
            "regions": [{"bbox": list(lesion.box), "caption": caption, "label": lesion.kind}
                        for lesion, caption in zip(lesions, captions, strict=True)],
            "negative_captions": make_hard_negatives(report, num=3, seed=seed),
            "labels": sorted({lesion.kind for lesion in lesions}) or ["No finding"],
            "uncertain_labels": [],
            "split": _split(index),
        }
        records = _vqa_records(image_id, lesions, text_rng, qid)
        qid += len(records)
        yield row, records, negatives


def generate_rows(n: int, seed: int = 0, image_size: int = 256) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Yield `(canonical row, VQA records)` for images 0..n-1; deterministic in (n, seed, image_size)."""
    for row, records, _ in _generate(n, seed, image_size):
        yield row, records


def write_synthetic_dataset(output_dir: str | Path, n: int, seed: int = 0, image_size: int = 256,
                            rows_per_shard: int = 1000) -> dict[str, Any]:
    """Write `n` synthetic rows as canonical parquet shards plus `vqa/{split}.json` and
    `region_negatives/{split}.json`; returns a summary."""
    output_dir = Path(output_dir)
    start = time.perf_counter()
    vqa: dict[str, list[dict[str, Any]]] = {}
    negatives: dict[str, list[dict[str, Any]]] = {}
    with dataset_output(output_dir) as partial:  # a killed run leaves no split that loads as complete
        with ShardedParquetWriter(partial, rows_per_shard) as writer:
            for row, records, region_records in _generate(n, seed, image_size):
                writer.write(row)
                vqa.setdefault(row["split"], []).extend(records)
                negatives.setdefault(row["split"], []).extend(region_records)
        for directory, per_split in (("vqa", vqa), (REGION_NEGATIVES_DIR, negatives)):
            (partial / directory).mkdir(exist_ok=True)
            for split, records in per_split.items():
                (partial / directory / f"{split}.json").write_text(json.dumps(records, indent=1))
        write_provenance(partial, "regionmed-data synth", real_patient_data=False, n=n, seed=seed,
                         image_size=image_size, rows=dict(writer.counts))
    return {
        "rows": writer.counts,
        "vqa_questions": {split: len(records) for split, records in vqa.items()},
        "region_negatives": {split: len(records) for split, records in negatives.items()},
        "seconds": round(time.perf_counter() - start, 2),
        "output_dir": str(output_dir),
    }
