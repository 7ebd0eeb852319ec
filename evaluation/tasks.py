"""The evaluation tasks behind `regionmed-eval {zero-shot,region,grounding,retrieval}`.

Each task loads a saved model folder and one split of a canonical dataset, encodes what it needs
once (cached as safetensors, `evaluation.embeddings`), scores it, draws its figures and returns the
`results.json` record (`evaluation.results`). Rows a task cannot use are skipped and counted, bad
regions dropped (`evaluation.rows`); the record's `rows` says over how many rows it ran. Units: AUROC and accuracies are fractions; Recall@K
is in percent; every interval is a 95% percentile bootstrap over images (zero-shot, retrieval) or
regions / phrases (region, grounding).

* **zero-shot**: class prompts (YAML templates, prompt ensembles) scored box-free, by default from
  each class's best-matching proposal (every proposal classified among the classes and the model's
  background caption, the class's largest probability over the film's proposals), or from the
  pooled image embedding (positive-vs-negative prompt pairs); multi-label (uncertain labels by
  policy) or multi-class (argmax over the classes). With `use_regions` the dataset's boxes are
  pooled into the image embeddings and reported separately.
* **region**: each annotated box's region embedding classified against the class prompts
  (multi-class over the region labels), with the probe's controls: crops blanked, boxes mirrored,
  box geometry removed.
* **grounding**: each region caption (phrase) ranks (a) the boxes of its image and (b) sliding-window
  proposals over the image; pointing accuracy, top-1 IoU > threshold, and the chance rates.
* **retrieval**: image<->text Recall@K and median rank (several captions per image), chunked.
* **vqa**: a `RegionMedCLIPForVQA` folder answers the split's questions (`DATA/vqa/{split}.json`):
  closed, open and overall accuracy of the normalised answers.
"""

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from regionmed_clip.data.fingerprints import dataset_fingerprint, file_sha256
from regionmed_clip.figures import (
    COLOURS,
    confusion_grid,
    overlay_regions,
    plot_bars,
    plot_roc_curves,
    retrieval_grid,
    save_figure,
)
from regionmed_clip.processing import CAPTION_LEVELS, proposal_heatmap, proposal_windows
from regionmed_clip.scoring import ANSWER_TYPES, bootstrap_interval, normalize_answer

from .embeddings import EmbeddingCache, encode_images, encode_proposals, encode_regions, encode_texts
from .probe import (
    CONDITIONS,
    blank_crops,
    mirror_boxes,
    model_logit_scale,
    proposal_class_probabilities,
    remove_box_geometry,
    zero_shot_scores,
)
from .results import headline_entry, model_fingerprint, results_record
from .retrieval import rank_summary, retrieval_ranks
from .rows import EvaluationInputError, RowNeeds, decode_image, image_problem, screen_rows
from .zero_shot import (
    DEFAULT_PROMPTS,
    UNCERTAIN_POLICIES,
    label_matrix,
    load_prompt_templates,
    multiclass_report,
    multilabel_report,
    prompts_for,
)

__all__ = [
    "CAPTION_COLUMNS",
    "EvalSettings",
    "SCORINGS",
    "ZERO_SHOT_MODES",
    "box_iou",
    "grounding_outcomes",
    "run_grounding",
    "run_region",
    "run_retrieval",
    "run_vqa",
    "run_zero_shot",
]

ZERO_SHOT_MODES: tuple[str, ...] = ("auto", "multilabel", "multiclass")
# Box-free zero-shot scoring: each class's best-matching proposal (default), or the pooled image embedding.
SCORINGS: tuple[str, ...] = ("best-region", "pooled")
# The caption levels a film has one of, and their canonical columns (from `processing.CAPTION_LEVELS`).
CAPTION_COLUMNS: dict[str, str] = {level.name: level.source for level in CAPTION_LEVELS if level.shape in ("(T, L)", "(B, L)")}
_NO_FINDING_NAMES = frozenset({"no finding", "no findings", "normal"})
_FIGURE_EXAMPLES = 6  # images drawn in the overlay and grid figures


@dataclasses.dataclass
class EvalSettings:
    """What every task needs: the model and data, where to write, and how to run."""

    model_dir: Path
    data_dir: Path
    output_dir: Path
    split: str = "test"
    batch_size: int = 32
    device: str | None = None
    limit: int | None = None
    cache_dir: Path | None = None  # default: output_dir / "embeddings"; pass the same folder to re-score
    progress: bool = False
    resamples: int = 1000
    seed: int = 0
    command: str = ""

    def __post_init__(self) -> None:
        self.model_dir, self.data_dir, self.output_dir = Path(self.model_dir), Path(self.data_dir), Path(self.output_dir)
        if self.batch_size <= 0:
            raise EvaluationInputError(f"--batch-size must be positive, got {self.batch_size}")
        if self.resamples < 0:
            raise EvaluationInputError(f"--resamples must be >= 0, got {self.resamples}")
        if not self.model_dir.is_dir() or not (self.model_dir / "config.json").is_file():
            raise EvaluationInputError(f"--model: {str(self.model_dir)!r} is not a saved model folder (no config.json)")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise EvaluationInputError(f"--output: {str(self.output_dir)!r} exists and is not a folder")

    def as_dict(self) -> dict[str, Any]:
        return {"split": self.split, "batch_size": self.batch_size, "device": self.device, "limit": self.limit,
                "resamples": self.resamples, "seed": self.seed}


class _Run:
    """A task's loaded model, processor, usable rows (`evaluation.rows`: the others skipped and counted)
    and embedding cache."""

    def __init__(self, settings: EvalSettings, needs: RowNeeds, auto_class: str = "AutoModel"):
        from .probe import _load, _load_rows, _resolve_device

        self.settings = settings
        rows = _load_rows(settings.data_dir, settings.split, settings.limit, decode_images=False)
        self.device = _resolve_device(settings.device)
        self.model, self.processor = _load(settings.model_dir, self.device, auto_class)
        self.dataset = dataset_fingerprint(settings.data_dir, settings.split)
        self.model_info = model_fingerprint(settings.model_dir)
        image_processor = self.processor.image_processor
        folder = settings.cache_dir if settings.cache_dir is not None else settings.output_dir / "embeddings"
        key = {"model": self.model_info, "data_files": self.dataset["files"], "split": settings.split,
               "limit": settings.limit, "image_processor": image_processor.to_dict()}
        checks = EmbeddingCache(folder, key).get_or_compute_json(
            "image_checks", lambda: _image_checks(rows, image_processor, settings.batch_size, settings.progress))
        screened = screen_rows(list(rows.remove_columns("image")), checks, needs, image_processor,
                               lambda: f"split {settings.split!r} of {str(settings.data_dir)!r}")
        self.rows = rows if len(screened.indices) == len(rows) else rows.select(screened.indices)
        self.meta, self.sizes, self.skips = screened.meta, screened.sizes, screened.skips
        self.skipped_ids = screened.skipped_ids
        # the rows used are part of every cached set's identity (another task may skip other rows)
        self.cache = EmbeddingCache(folder, {**key, "rows_used": _digest(screened.indices)})
        self.images = _ImageColumn(self.rows, image_processor)

    def column(self, name: str) -> list[Any]:
        if name not in self.rows.column_names:
            raise EvaluationInputError(f"--data: split {self.settings.split!r} has no {name!r} column")
        return [row.get(name) for row in self.meta]

    def image_embeds(self, boxes: list[list[list[float]]] | None = None) -> torch.Tensor:
        name = "images" if boxes is None else "images_with_boxes"
        return self.cache.get_or_compute(name, lambda: {"embeds": encode_images(
            self.model, self.processor, self.images, self.settings.batch_size, self.device, boxes,
            self.settings.progress)}, extra=None if boxes is None else {"boxes": _digest(boxes)})["embeds"]

    def proposal_embeds(self) -> dict[str, torch.Tensor]:
        """Box-free, every proposal kept (`encode_proposals`), cached."""
        return self.cache.get_or_compute("proposals", lambda: encode_proposals(  # the grid is in the cache key
            self.model, self.processor, self.images, self.settings.batch_size, self.device, self.settings.progress))

    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_texts(self.model, self.processor, texts, self.settings.batch_size, self.device,
                            self.settings.progress)

    def record(self, task: str, n_examples: int, metrics: dict[str, Any], headline: dict[str, Any],
               settings: dict[str, Any], prompts: dict[str, Any] | None, figures: list[str]) -> dict[str, Any]:
        return results_record(task, self.dataset, n_examples, metrics, headline, self.model_info,
                              self.settings.command, {**self.settings.as_dict(), "device": str(self.device), **settings},
                              prompts, figures, rows=self.skips.to_dict())


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def _image_checks(rows: Any, image_processor: Any, batch_size: int, progress: bool) -> list[list[Any]]:
    """`[[width, height] or None, why or None]` per row: each image decoded once, as the processor reads it."""
    checks = []
    with tqdm(total=len(rows), desc="checking images", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(rows), batch_size):
            for value in rows[start : start + batch_size]["image"]:
                size, problem = image_problem(value, image_processor)
                checks.append([None if size is None else list(size), problem])
            bar.update(min(batch_size, len(rows) - start))
    return checks


class _ImageColumn(Sequence):
    """The usable rows' images, decoded on access a slice at a time (a whole column never sits in memory)."""

    def __init__(self, rows: Any, image_processor: Any = None):
        self._rows = rows
        self._image_processor = image_processor

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [decode_image(value, self._image_processor) for value in self._rows[index]["image"]]
        return decode_image(self._rows[int(index)]["image"], self._image_processor)


def _classes(label_lists: Sequence[Sequence[str]], requested: Sequence[str] | None, what: str = "labels") -> list[str]:
    if requested is not None:
        classes = [name.strip() for name in requested]
        if not classes or any(not name for name in classes) or len(set(classes)) != len(classes):
            raise EvaluationInputError(f"--classes must be distinct non-empty names, got {list(requested)}")
        known = {label for labels in label_lists for label in labels}
        unknown = [name for name in classes if name not in known]
        if unknown:
            raise EvaluationInputError(f"--classes: {unknown} not among the split's {what} ({sorted(known)})")
        return classes
    classes = sorted({label for labels in label_lists for label in labels if label.lower() not in _NO_FINDING_NAMES})
    if not classes:
        raise EvaluationInputError("the split has no class labels other than 'no finding'; pass --classes")
    return classes


def _templates(prompts_path: str | Path) -> dict[str, Any]:
    if not Path(prompts_path).is_file():
        raise EvaluationInputError(f"--prompts: no prompt-template file at {str(prompts_path)!r}")
    try:
        return load_prompt_templates(prompts_path)
    except (OSError, ValueError) as error:  # a file that is there but unusable: a bad input, exit 1
        raise ValueError(f"--prompts: {error}") from None


def _prompt_embeds(run: _Run, prompts: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"positive"|"negative": {class: (P, D)}}` normalised prompt embeddings (each text encoded once)."""
    texts = sorted({text for side in prompts.values() for group in side.values() for text in group})
    encoded = dict(zip(texts, run.text_embeds(texts), strict=True))
    return {side: {name: torch.stack([encoded[text] for text in group]) for name, group in groups.items()}
            for side, groups in prompts.items()}


def _ensemble_matrix(prompt_embeds: dict[str, torch.Tensor], classes: Sequence[str]) -> torch.Tensor:
    """`(C, D)`: per class the mean of its normalised prompt embeddings, renormalised."""
    return torch.nn.functional.normalize(
        torch.stack([torch.nn.functional.normalize(prompt_embeds[name].double(), dim=-1).mean(0) for name in classes]),
        dim=-1)


def _roc_figure(run: _Run, scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, classes: Sequence[str],
                aurocs: dict[str, float], name: str, title: str) -> list[str]:
    curves = {cls: (scores[valid[:, k], k], labels[valid[:, k], k]) for k, cls in enumerate(classes)
              if not math.isnan(aurocs[cls])}
    if not curves:
        return []
    plot_roc_curves(curves, aurocs, run.settings.output_dir / name, title)
    return [name]


# -- zero-shot ------------------------------------------------------------------------------------


def _pooled_scores(image_embeds: torch.Tensor, prompt_embeds: dict[str, dict[str, torch.Tensor]], classes: list[str],
                   mode: str) -> np.ndarray:
    """`(N, C)` class scores of image embeddings: positive minus negative prompts (multi-label), or the
    cosine with the positive ensemble (multi-class)."""
    if mode == "multilabel":
        by_class = zero_shot_scores(image_embeds, prompt_embeds["positive"], prompt_embeds["negative"])
        return torch.stack([by_class[name] for name in classes], dim=1).numpy()
    images = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    return (images @ _ensemble_matrix(prompt_embeds["positive"], classes).t()).numpy()


def _proposal_probabilities(run: "_Run", prompt_embeds: dict[str, dict[str, torch.Tensor]], classes: list[str]
                            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The split's proposals (`encode_proposals`) and each one's class probabilities `(N, P, C)`, zero
    at padding (`probe.proposal_class_probabilities`: the classes against the model's background caption)."""
    proposals = run.proposal_embeds()
    background = run.text_embeds([run.model.config.background_caption])
    probabilities = proposal_class_probabilities(proposals["proposal_embeds"],
                                                 {name: prompt_embeds["positive"][name] for name in classes},
                                                 background, model_logit_scale(run.model))
    return proposals, probabilities * proposals["proposal_mask"][..., None]


def _pointing_game(probabilities: torch.Tensor, proposals: dict[str, torch.Tensor], regions: list[list[dict]],
                   classes: list[str]) -> dict[str, Any]:
    """Per class, over the films with a box of that class: does the class's best proposal point into one
    (its centre inside the box), and the chance rate (the fraction of the film's proposals that would)."""
    per_class: dict[str, dict[str, Any]] = {}
    for column, name in enumerate(classes):
        hits, chances = [], []
        for index, film_regions in enumerate(regions):
            boxes = torch.tensor([region["bbox"] for region in film_regions if region.get("label") == name],
                                 dtype=torch.float64).reshape(-1, 4)
            if not len(boxes):
                continue
            valid = proposals["proposal_mask"][index]
            centres = proposals["proposal_boxes"][index][valid].double()
            centres = (centres[:, :2] + centres[:, 2:]) / 2
            inside = ((centres[:, None] >= boxes[None, :, :2]) & (centres[:, None] <= boxes[None, :, 2:])).all(-1).any(1)
            hits.append(bool(inside[int(probabilities[index][valid][:, column].argmax())]))
            chances.append(float(inside.double().mean()))
        if hits:
            per_class[name] = {"pointing_accuracy": float(np.mean(hits)), "chance": float(np.mean(chances)),
                               "n": len(hits)}
    every = [entry for entry in per_class.values()]
    total = sum(entry["n"] for entry in every)
    return {"per_class": per_class,
            "pointing_accuracy": sum(entry["pointing_accuracy"] * entry["n"] for entry in every) / total if total else
            float("nan"),
            "chance": sum(entry["chance"] * entry["n"] for entry in every) / total if total else float("nan"),
            "n": total}


def _heatmap_pictures(run: "_Run", probabilities: torch.Tensor, proposals: dict[str, torch.Tensor],
                      label_lists: list[list[str]], classes: list[str], regions: list[list[dict]] | None) -> list[Any]:
    """Up to `_FIGURE_EXAMPLES` films with a finding: its first class's proposal probabilities painted
    back onto the film (`proposal_heatmap`), the best proposal (yellow) and the true boxes of that class (green)."""
    pictures = []
    for index, labels in enumerate(label_lists):
        names = [name for name in labels if name in classes]
        if not names or len(pictures) >= _FIGURE_EXAMPLES:
            continue
        column, image = classes.index(names[0]), run.images[index]
        valid = proposals["proposal_mask"][index]
        boxes, values = proposals["proposal_boxes"][index][valid], probabilities[index][valid][:, column]
        heat = proposal_heatmap(boxes.numpy(), values.numpy(), image.height, image.width)
        truth = [region["bbox"] for region in (regions[index] if regions else []) if region.get("label") == names[0]]
        pictures.append(overlay_regions(image, [*truth, boxes[int(values.argmax())].tolist()],
                                        [names[0]] * len(truth) + ["best proposal"],
                                        [COLOURS[2]] * len(truth) + [(255, 215, 0)], heatmap=heat,
                                        title=f"{names[0]}: p={float(values.max()):.2f}", side=320))
    return pictures


def _zero_shot_block(
    scores: np.ndarray, classes: list[str], mode: str,
    label_lists: list[list[str]], uncertain: list[list[str]] | None, policy: str, settings: EvalSettings,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The report of one `(N, C)` score matrix, and the (labels, valid) `(N, C)` it used."""
    interval = {"resamples": settings.resamples, "seed": settings.seed}
    if mode == "multilabel":
        labels, valid = label_matrix(label_lists, classes, uncertain, policy)
        return multilabel_report(scores, labels, valid, classes, **interval), labels, valid
    targets = np.array([classes.index(labels[0]) for labels in label_lists])
    one_hot = np.eye(len(classes))[targets]
    return multiclass_report(scores, targets, classes, **interval), one_hot, np.ones_like(one_hot, dtype=bool)


def _zero_shot_headline(block: dict[str, Any], mode: str, suffix: str = "") -> dict[str, Any]:
    if mode == "multilabel":
        return {f"macro_auroc{suffix}": headline_entry(block["macro_auroc"], block.get("macro_auroc_interval"))}
    return {f"accuracy{suffix}": headline_entry(block["accuracy"], block["accuracy_interval"]),
            f"macro_f1{suffix}": headline_entry(block["macro_f1"], block["macro_f1_interval"])}


def run_zero_shot(
    settings: EvalSettings,
    classes: Sequence[str] | None = None,
    prompts_path: str | Path = DEFAULT_PROMPTS,
    mode: str = "auto",
    uncertain_policy: str = "ignore",
    use_regions: bool = False,
    scoring: str = "best-region",
) -> dict[str, Any]:
    """Zero-shot classification of the split's images from class prompts (see the module docstring).

    `mode` "auto" is multi-class when every image has exactly one label among the classes and none
    is uncertain, else multi-label. `uncertain_policy` (one of `UNCERTAIN_POLICIES`) applies to the
    `uncertain_labels` column where the dataset has one. `scoring` (one of `SCORINGS`) says what the
    box-free headline scores: each class's best-matching proposal, or the pooled image embedding
    (`get_image_features`); the other is reported beside it.
    """
    if mode not in ZERO_SHOT_MODES:
        raise EvaluationInputError(f"--mode must be one of {ZERO_SHOT_MODES}, got {mode!r}")
    if scoring not in SCORINGS:
        raise EvaluationInputError(f"--scoring must be one of {SCORINGS}, got {scoring!r}")
    if uncertain_policy not in UNCERTAIN_POLICIES:
        raise EvaluationInputError(f"--uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain_policy!r}")
    templates = _templates(prompts_path)
    run = _Run(settings, RowNeeds(labels=True, regions=use_regions))
    label_lists = run.column("labels")
    uncertain = [[name for name in names or [] if isinstance(name, str)] for names in run.column("uncertain_labels")]
    uncertain = uncertain if any(uncertain) else None
    class_list = _classes(label_lists if uncertain is None else [*label_lists, *uncertain], classes)
    in_classes = [[name for name in labels if name in class_list] for labels in label_lists]
    single = all(len(labels) == 1 for labels in in_classes) and uncertain is None
    if mode == "auto":
        mode = "multiclass" if single else "multilabel"
    elif mode == "multiclass" and not single:
        bad = next(index for index, labels in enumerate(in_classes) if len(labels) != 1)
        raise EvaluationInputError(f"--mode multiclass needs exactly one label per image among the classes; image {bad} "
                              f"({run.meta[bad]['image_id']!r}) has {in_classes[bad]}")
    prompts = prompts_for(templates, class_list)
    prompt_embeds = _prompt_embeds(run, prompts)
    metrics: dict[str, Any] = {"mode": mode, "scoring": scoring}
    proposals, probabilities = _proposal_probabilities(run, prompt_embeds, class_list)
    by_scoring = {"best-region": lambda: probabilities.max(dim=1).values.numpy(),
                  "pooled": lambda: _pooled_scores(run.image_embeds(), prompt_embeds, class_list, mode)}
    scores = by_scoring[scoring]()
    block, labels, valid = _zero_shot_block(scores, class_list, mode, in_classes, uncertain, uncertain_policy, settings)
    metrics["box_free"] = block
    other = next(name for name in SCORINGS if name != scoring)
    metrics[f"box_free_{other.replace('-', '_')}"] = _zero_shot_block(by_scoring[other](), class_list, mode, in_classes,
                                                                      uncertain, uncertain_policy, settings)[0]
    headline = _zero_shot_headline(block, mode)
    aurocs = {name: entry["auroc"] for name, entry in block["per_class"].items()}
    figures = _roc_figure(run, scores, labels, valid, class_list, aurocs, "roc_curves.png",
                          f"zero-shot ROC, box-free ({run.dataset['name']} {settings.split})")
    regions = run.column("regions") if use_regions else None
    pictures = _heatmap_pictures(run, probabilities, proposals, in_classes, class_list, regions)
    if pictures:  # where each finding is, for free: the proposals' probabilities over the film
        save_figure(_sheet(pictures), settings.output_dir / "box_free_heatmaps.png")
        figures.append("box_free_heatmaps.png")
    if regions is not None:
        pointing = _pointing_game(probabilities, proposals, regions, class_list)
        metrics["pointing_game"] = pointing
        if pointing["n"]:
            headline["pointing_game"] = headline_entry(pointing["pointing_accuracy"])
            plot_bars({name: {"best proposal in a box": entry["pointing_accuracy"], "chance": entry["chance"]}
                       for name, entry in pointing["per_class"].items()}, settings.output_dir / "pointing_game.png",
                      f"box-free pointing game: does each class's best proposal point into its box? "
                      f"({pointing['pointing_accuracy']:.2f}, chance {pointing['chance']:.2f})",
                      y_label="share of the class's films")
            figures.append("pointing_game.png")
    if use_regions:
        boxes = [[region["bbox"] for region in film] for film in regions]
        with_boxes, *_ = _zero_shot_block(_pooled_scores(run.image_embeds(boxes), prompt_embeds, class_list, mode),
                                          class_list, mode, in_classes, uncertain, uncertain_policy, settings)
        with_boxes["images_with_boxes"] = sum(1 for image_boxes in boxes if image_boxes)
        metrics["with_regions"] = with_boxes
        headline.update(_zero_shot_headline(with_boxes, mode, "_with_regions"))
    return run.record("zero-shot", len(run.rows), metrics, headline,
                      {"classes": class_list, "mode": mode, "uncertain_policy": uncertain_policy,
                       "use_regions": use_regions, "scoring": scoring, "prompt_templates": str(Path(prompts_path).resolve())},
                      prompts, figures)


# -- region-level zero-shot ------------------------------------------------------------------------


def _controls(processor: Any) -> dict[str, Any]:
    image_processor = processor.image_processor
    return {
        "true": lambda roi: roi,
        "crops_blanked": lambda roi: blank_crops(roi, image_processor.image_mean, image_processor.image_std,
                                                 image_processor.pad_value),
        "boxes_mirrored": mirror_boxes,
        "box_geometry_removed": remove_box_geometry,
    }


def _region_figure(run: _Run, boxes: list[list[list[float]]], predicted: list[str], truth: list[str]) -> list[str]:
    """Overlays of the first images with boxes: green where the region was classified right."""
    pictures, offset = [], 0
    for index, image_boxes in enumerate(boxes):
        count = len(image_boxes)
        if count and len(pictures) < _FIGURE_EXAMPLES:
            names = predicted[offset : offset + count]
            colours = [(0, 200, 0) if p == t else (230, 30, 30) for p, t in zip(names, truth[offset : offset + count],
                                                                                strict=True)]
            pictures.append(overlay_regions(run.images[index], image_boxes, names, colours,
                                            title=f"{run.meta[index]['image_id']}: predicted class per box", side=320))
        offset += count
    if not pictures:
        return []
    sheet = _sheet(pictures)
    save_figure(sheet, run.settings.output_dir / "region_overlays.png")
    return ["region_overlays.png"]


def _sheet(pictures: Sequence[Any], columns: int = 3) -> Any:
    from PIL import Image

    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    rows = math.ceil(len(pictures) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, picture in enumerate(pictures):
        sheet.paste(picture, ((index % columns) * width, (index // columns) * height))
    return sheet


def run_region(
    settings: EvalSettings, classes: Sequence[str] | None = None, prompts_path: str | Path = DEFAULT_PROMPTS
) -> dict[str, Any]:
    """Region-level zero-shot: every annotated box whose label is a class is classified by its region
    embedding against the class prompt ensembles (multi-class), with the true inputs and the three
    controls. The controls say what the number rests on: crops blanked -> the crop pixels; boxes
    mirrored or geometry removed -> the box coordinates."""
    templates = _templates(prompts_path)
    run = _Run(settings, RowNeeds(regions=True, region_label=True))
    regions = run.column("regions")
    class_list = _classes([[region["label"] for region in image_regions] for image_regions in regions], classes,
                          "region labels")
    if len(class_list) < 2:
        raise EvaluationInputError(f"region classification needs >= 2 region classes, the split has {class_list}")
    boxes = [[region["bbox"] for region in image_regions if region["label"] in class_list] for image_regions in regions]
    truth = [region["label"] for image_regions in regions for region in image_regions if region["label"] in class_list]
    if not truth:
        raise EvaluationInputError("no region of the split carries one of the classes")
    embeds = run.cache.get_or_compute("regions", lambda: encode_regions(
        run.model, run.processor, run.images, boxes, settings.batch_size, run.device, _controls(run.processor),
        settings.progress), extra={"boxes": _digest(boxes)})
    prompts = prompts_for(templates, class_list)
    class_embeds = _ensemble_matrix(_prompt_embeds(run, prompts)["positive"], class_list)
    targets = np.array([class_list.index(label) for label in truth])
    metrics: dict[str, Any] = {"conditions": {}}
    for condition in CONDITIONS:
        scores = (embeds[condition].double() @ class_embeds.t()).numpy()
        metrics["conditions"][condition] = multiclass_report(scores, targets, class_list, resamples=settings.resamples,
                                                              seed=settings.seed)
        if condition == "true":
            true_scores = scores
    true = metrics["conditions"]["true"]
    aurocs = {name: entry["auroc"] for name, entry in true["per_class"].items()}
    true["macro_auroc"] = float(np.nanmean(list(aurocs.values())))
    one_hot = np.eye(len(class_list))[targets]
    figures = _roc_figure(run, true_scores, one_hot, np.ones_like(one_hot, dtype=bool), class_list, aurocs,
                          "roc_curves.png", f"region zero-shot ROC, true crops ({run.dataset['name']} {settings.split})")
    figures += _region_figure(run, boxes, [class_list[k] for k in true_scores.argmax(1)], truth)
    headline = {"accuracy": headline_entry(true["accuracy"], true["accuracy_interval"]),
                "macro_auroc": headline_entry(true["macro_auroc"])}
    for control in CONDITIONS[1:]:
        entry = metrics["conditions"][control]
        headline[f"accuracy_{control}"] = headline_entry(entry["accuracy"], entry["accuracy_interval"])
    return run.record("region", len(truth), metrics, headline,
                      {"classes": class_list, "images": len(run.rows), "prompt_templates": str(Path(prompts_path).resolve())},
                      {"positive": prompts["positive"]}, figures)


# -- phrase grounding ------------------------------------------------------------------------------


def box_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU of each of `boxes` `(K, 4)` with `box` `(4,)`, xyxy: `(K,)`."""
    top_left = torch.maximum(boxes[:, :2], box[:2])
    bottom_right = torch.minimum(boxes[:, 2:], box[2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(1)
    return intersection / (area + (box[2:] - box[:2]).prod() - intersection)


def grounding_outcomes(
    phrase_embeds: torch.Tensor, candidate_embeds: torch.Tensor, candidate_boxes: torch.Tensor, true_boxes: torch.Tensor,
    iou_threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Per phrase (all of one image): the best-scoring candidate box, and whether it points into the
    phrase's true box (its centre inside) and overlaps it by IoU > `iou_threshold`; with the chance
    rate of each (the fraction of candidates that would succeed).

    phrase_embeds `(P, D)`, candidate_embeds `(K, D)` (normalised), candidate_boxes `(K, 4)`,
    true_boxes `(P, 4)` xyxy. Returns `{"top": (P,), "pointing", "iou_hit": (P,) bool,
    "pointing_chance", "iou_chance": (P,) float}`.
    """
    top = (phrase_embeds @ candidate_embeds.t()).argmax(1)
    centres = (candidate_boxes[:, :2] + candidate_boxes[:, 2:]) / 2
    inside = ((centres[None] >= true_boxes[:, None, :2]) & (centres[None] <= true_boxes[:, None, 2:])).all(-1)  # (P, K)
    overlaps = torch.stack([box_iou(candidate_boxes, box) for box in true_boxes]) > iou_threshold
    rows = torch.arange(len(top))
    return {"top": top, "pointing": inside[rows, top], "iou_hit": overlaps[rows, top],
            "pointing_chance": inside.double().mean(1), "iou_chance": overlaps.double().mean(1)}


def _rate(hits: list[bool], settings: EvalSettings) -> dict[str, Any]:
    values = np.asarray(hits, dtype=np.float64)
    if not values.size:
        return {"value": float("nan"), "n": 0}
    low, high = (bootstrap_interval(np.mean, values, resamples=settings.resamples, seed=settings.seed)
                 if settings.resamples else (None, None))
    return {"value": float(values.mean()), "low": low, "high": high, "n": int(values.size)}


def run_grounding(
    settings: EvalSettings, window_sizes: Sequence[float] | None = None, stride: float | None = None,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Phrase grounding with each region caption as the phrase (MS-CXR style): (a) among the image's
    annotated boxes (images with >= 2 boxes), is the phrase's own box ranked first; (b) among
    sliding-window proposals (box-free), does the top window point into the true box and overlap
    it by IoU > `iou_threshold`. Chance rates are reported beside each. The windows are the image
    processor's box-free proposals (`proposal_windows`), with `window_sizes` / `stride` its own by default."""
    run = _Run(settings, RowNeeds(regions=True, region_caption=True))
    window_sizes = run.processor.image_processor.proposal_sizes if window_sizes is None else list(window_sizes)
    stride = run.processor.image_processor.proposal_stride if stride is None else stride
    regions = run.column("regions")
    phrases = [region["caption"] for image_regions in regions for region in image_regions]
    if not phrases:
        raise EvaluationInputError("no region of the split has a box and caption: nothing to ground")
    phrase_embeds = run.text_embeds(phrases)
    boxes = [[region["bbox"] for region in image_regions] for image_regions in regions]
    box_embeds = run.cache.get_or_compute("regions_true", lambda: encode_regions(
        run.model, run.processor, run.images, boxes, settings.batch_size, run.device, progress=settings.progress),
        extra={"boxes": _digest(boxes)})["true"]
    if len(box_embeds) != len(phrases):
        raise EvaluationInputError(f"the processor kept {len(box_embeds)} of the split's {len(phrases)} boxes")
    sizes = run.sizes
    windows = [proposal_windows([0, 0, width, height], window_sizes, stride).tolist() if image_boxes else []
               for (width, height), image_boxes in zip(sizes, boxes, strict=True)]
    window_embeds = run.cache.get_or_compute(
        f"proposals_{'_'.join(str(size) for size in window_sizes)}_stride{stride}",
        lambda: encode_regions(run.model, run.processor, run.images, windows, max(1, settings.batch_size // 8),
                               run.device, progress=settings.progress))["true"]
    among_boxes: dict[str, list] = {"hit": [], "chance": []}
    proposals: dict[str, list] = {"pointing": [], "iou_hit": [], "pointing_chance": [], "iou_chance": []}
    pictures = []
    phrase_offset = window_offset = 0
    for index, image_boxes in enumerate(boxes):
        count, window_count = len(image_boxes), len(windows[index])
        if not count:
            continue
        truth = torch.tensor(image_boxes, dtype=torch.float64)
        own = phrase_embeds[phrase_offset : phrase_offset + count].double()
        if count >= 2:
            ranked = (own @ box_embeds[phrase_offset : phrase_offset + count].double().t()).argmax(1)
            among_boxes["hit"] += (ranked == torch.arange(count)).tolist()
            among_boxes["chance"] += [1.0 / count] * count
        candidates = window_embeds[window_offset : window_offset + window_count].double()
        candidate_boxes = torch.tensor(windows[index], dtype=torch.float64)
        outcome = grounding_outcomes(own, candidates, candidate_boxes, truth, iou_threshold)
        for key in proposals:
            proposals[key] += outcome[key].tolist()
        if len(pictures) < _FIGURE_EXAMPLES:
            pictures.append(_grounding_picture(run, index, regions[index][0]["caption"], image_boxes[0],
                                               candidates, candidate_boxes, own[0], sizes[index]))
        phrase_offset += count
        window_offset += window_count
    metrics = {
        "among_boxes": {"pointing_accuracy": _rate(among_boxes["hit"], settings),
                        "chance": float(np.mean(among_boxes["chance"])) if among_boxes["chance"] else float("nan")},
        "proposals": {"pointing_accuracy": _rate(proposals["pointing"], settings),
                      "pointing_chance": float(np.mean(proposals["pointing_chance"])),
                      f"top1_iou>{iou_threshold}": _rate(proposals["iou_hit"], settings),
                      f"top1_iou>{iou_threshold}_chance": float(np.mean(proposals["iou_chance"])),
                      "windows_per_image": float(np.mean([len(w) for w in windows if w]))},
    }
    figures = []
    if pictures:
        save_figure(_sheet(pictures), settings.output_dir / "grounding_heatmaps.png")
        figures.append("grounding_heatmaps.png")
    headline = {
        "pointing_among_boxes": headline_entry(metrics["among_boxes"]["pointing_accuracy"]["value"],
                                               metrics["among_boxes"]["pointing_accuracy"]),
        "pointing_proposals": headline_entry(metrics["proposals"]["pointing_accuracy"]["value"],
                                             metrics["proposals"]["pointing_accuracy"]),
        f"top1_iou>{iou_threshold}": headline_entry(metrics["proposals"][f"top1_iou>{iou_threshold}"]["value"],
                                                    metrics["proposals"][f"top1_iou>{iou_threshold}"]),
    }
    return run.record("grounding", len(phrases), metrics, headline,
                      {"window_sizes": list(window_sizes), "stride": stride, "iou_threshold": iou_threshold,
                       "images": len(run.rows)}, None, figures)


def _grounding_picture(run: _Run, index: int, phrase: str, true_box: Sequence[float], candidates: torch.Tensor,
                       candidate_boxes: torch.Tensor, phrase_embed: torch.Tensor, size: tuple[int, int]) -> Any:
    """The image with the phrase's similarity heat map (the mean over the windows covering each pixel),
    its true box (green) and the top window (yellow)."""
    width, height = size
    similarity = candidates @ phrase_embed
    heat = proposal_heatmap(candidate_boxes.numpy(), similarity.numpy(), height, width)
    top = candidate_boxes[int(similarity.argmax())].tolist()
    return overlay_regions(run.images[index], [true_box, top], ["true", "top window"], [COLOURS[2], (255, 215, 0)],
                           heatmap=heat, title=phrase[:60], side=320)


# -- retrieval -------------------------------------------------------------------------------------


def run_retrieval(settings: EvalSettings, captions: Sequence[str] = ("report",), ks: Sequence[int] = (1, 5, 10),
                  memory_budget_bytes: int = 256 * 2**20) -> dict[str, Any]:
    """Box-free image<->text retrieval with the captions of `captions` (keys of `CAPTION_COLUMNS`;
    several give several texts per image). A text shared word for word by several images is left out
    (no model can tell which image it belongs to) and counted."""
    unknown = [name for name in captions if name not in CAPTION_COLUMNS]
    if unknown or not captions:
        raise EvaluationInputError(f"--captions must be among {sorted(CAPTION_COLUMNS)}, got {list(captions)}")
    if any(k <= 0 for k in ks):
        raise EvaluationInputError(f"--ks must be positive, got {list(ks)}")
    run = _Run(settings, RowNeeds(texts=tuple(CAPTION_COLUMNS[name] for name in captions)))
    owners: dict[str, set[int]] = {}
    for name in captions:
        for index, text in enumerate(run.column(CAPTION_COLUMNS[name])):
            if isinstance(text, str) and text.strip():
                owners.setdefault(text, set()).add(index)
    texts = [text for text, images in owners.items() if len(images) == 1]
    text_to_image = torch.tensor([next(iter(owners[text])) for text in texts], dtype=torch.long)
    if not texts:
        raise EvaluationInputError("no caption belongs to exactly one image: nothing to retrieve")
    image_embeds = run.image_embeds()
    text_embeds = run.cache.get_or_compute(f"texts_{'_'.join(captions)}", lambda: {"embeds": run.text_embeds(texts)})["embeds"]
    ranks = retrieval_ranks(image_embeds, text_embeds, text_to_image, memory_budget_bytes)
    metrics: dict[str, Any] = {"texts": len(texts), "images": len(run.rows),
                               "texts_shared_by_several_images": sum(len(images) > 1 for images in owners.values()),
                               "chance_R@1": {"image_to_text": 100.0 / len(texts), "text_to_image": 100.0 / len(run.rows)}}
    headline = {}
    for direction in ("image_to_text", "text_to_image"):
        block = rank_summary(ranks[direction], ks)
        direction_ranks = ranks[direction].numpy()
        for k in ks:
            if settings.resamples:
                low, high = bootstrap_interval(lambda r, k=k: 100.0 * float(np.mean(r < k)), direction_ranks,
                                               resamples=settings.resamples, seed=settings.seed)
                block[f"R@{k}_interval"] = {"low": low, "high": high}
            headline[f"{direction}_R@{k}"] = headline_entry(block[f"R@{k}"], block.get(f"R@{k}_interval"))
        metrics[direction] = block
    figures = _retrieval_figure(run, image_embeds, text_embeds, texts, text_to_image)
    return run.record("retrieval", len(run.rows), metrics, headline,
                      {"captions": list(captions), "ks": list(ks), "memory_budget_bytes": memory_budget_bytes},
                      None, figures)


def _retrieval_figure(run: _Run, image_embeds: torch.Tensor, text_embeds: torch.Tensor, texts: list[str],
                      text_to_image: torch.Tensor, top: int = 5) -> list[str]:
    """Text->image examples for the first texts: the top `top` images, the true one framed green."""
    count = min(_FIGURE_EXAMPLES, len(texts))
    ranking = (text_embeds[:count] @ image_embeds.t()).topk(min(top, len(image_embeds)), dim=1).indices
    retrieval_grid(texts[:count], [[run.images[int(i)] for i in row] for row in ranking],
                   [[int(i) == int(text_to_image[q]) for i in row] for q, row in enumerate(ranking)],
                   run.settings.output_dir / "retrieval_examples.png", side=96)
    return ["retrieval_examples.png"]


# -- VQA -------------------------------------------------------------------------------------------

_CONFUSION_ANSWERS = 12  # the most frequent reference answers drawn in the VQA confusion grid


@torch.no_grad()
def run_vqa(settings: EvalSettings, use_regions: bool = False, blank_images: bool = False) -> dict[str, Any]:
    """Answer every question of the split about its (first `--limit`) images with a VQA model folder
    (`regionmed-train-vqa`); accuracy of the normalised answers, closed / open / overall, with
    intervals. A reference answer outside the model's answer set can never be right: those are
    counted. With `use_regions` the dataset's boxes are given as ROI inputs (as in training).
    `blank_images` is the question-only control: every image is replaced by a black one of its size,
    so what accuracy remains comes from the questions' wording, not the pixels."""
    from regionmed_clip.data.vqa import load_vqa_examples, vqa_path

    auto_map = json.loads((settings.model_dir / "config.json").read_text()).get("auto_map", {})
    if "AutoModelForVisualQuestionAnswering" not in auto_map:
        raise EvaluationInputError(f"--model {str(settings.model_dir)!r} is not a VQA model folder (no answer set; "
                              "train one with regionmed-train-vqa)")
    run = _Run(settings, RowNeeds(regions=use_regions), auto_class="AutoModelForVisualQuestionAnswering")
    try:
        examples = load_vqa_examples(settings.data_dir, settings.split)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluationInputError(f"--data: {error}") from None
    row_of = {image_id: index for index, image_id in enumerate(run.column("image_id"))}
    about_skipped = sum(example.image_id in run.skipped_ids for example in examples)
    examples = [example for example in examples if example.image_id in row_of]  # --limit keeps the first images
    if not examples:
        raise EvaluationInputError(f"no question of split {settings.split!r} is about the images evaluated")
    boxes = run.column("regions") if use_regions else None
    id2label = run.model.config.id2label
    predictions = []
    progress = tqdm(total=len(examples), desc="questions", unit="q", disable=not settings.progress, leave=False)
    for start in range(0, len(examples), settings.batch_size):
        batch = examples[start : start + settings.batch_size]
        indices = [row_of[example.image_id] for example in batch]
        regions = [[region["bbox"] for region in boxes[index]] for index in indices] if use_regions else None
        images = [run.images[index] for index in indices]
        if blank_images:
            images = [Image.new("L", image.size) for image in images]
        inputs = run.processor(images=images, text=[example.question for example in batch], regions=regions,
                               proposals=False)
        keys = ["pixel_values", "input_ids", "attention_mask"] + (["roi_pixel_values", "roi_boxes", "roi_mask"]
                                                                   if use_regions else [])
        logits = run.model(**{key: inputs[key].to(run.device) for key in keys}).logits
        predictions += [id2label[int(index)] for index in logits.argmax(-1).tolist()]
        progress.update(len(batch))
    progress.close()
    references = [example.answer for example in examples]
    types = [example.answer_type for example in examples]
    correct = np.array([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)])
    known = set(run.model.config.label2id)
    metrics: dict[str, Any] = {"answers_in_model": len(known), "questions_about_skipped_images": about_skipped,
                               "references_outside_answer_set": sum(normalize_answer(r) not in known for r in references)}
    headline = {}
    for kind in ("overall", *ANSWER_TYPES):
        chosen = correct if kind == "overall" else correct[np.array(types) == kind]
        entry = _rate(chosen.tolist(), settings)
        metrics[f"{kind}_accuracy"] = entry
        headline[f"{kind}_accuracy"] = headline_entry(entry["value"], entry)
    metrics["majority_answer_accuracy"] = _majority_baseline(run.model.config.id2label[0], references, types)
    figures = _vqa_figure(run, predictions, references)
    record = run.record("vqa", len(examples), metrics, headline, {"use_regions": use_regions,
                                                                  "blank_images": blank_images}, None, figures)
    sidecar = vqa_path(settings.data_dir, settings.split)
    record["dataset"]["files"].append({"name": sidecar.relative_to(settings.data_dir).as_posix(),
                                       "bytes": sidecar.stat().st_size, "sha256": file_sha256(sidecar)})
    return record


def _majority_baseline(most_frequent_answer: str, references: Sequence[str], types: Sequence[str]) -> dict[str, float]:
    """Accuracy of always answering the training set's most frequent answer (id 0), overall and per type:
    the floor a VQA model must beat."""
    hits = np.array([normalize_answer(r) == most_frequent_answer for r in references])
    kinds = np.array(types)
    return {"answer": most_frequent_answer, "overall": float(hits.mean()),
            **{kind: float(hits[kinds == kind].mean()) if (kinds == kind).any() else float("nan") for kind in ANSWER_TYPES}}


def _vqa_figure(run: _Run, predictions: Sequence[str], references: Sequence[str]) -> list[str]:
    """Confusion grid of the most frequent reference answers (others pooled as "(other)")."""
    normalised = [normalize_answer(r) for r in references]
    counts: dict[str, int] = {}
    for answer in normalised:
        counts[answer] = counts.get(answer, 0) + 1
    shown = sorted(counts, key=lambda answer: (-counts[answer], answer))[:_CONFUSION_ANSWERS]
    labels = [*shown, "(other)"]
    position = {answer: index for index, answer in enumerate(shown)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for prediction, reference in zip(predictions, normalised, strict=True):
        matrix[position.get(reference, len(shown)), position.get(normalize_answer(prediction), len(shown))] += 1
    confusion_grid(matrix, labels, run.settings.output_dir / "vqa_confusion.png",
                   f"VQA answers, {run.dataset['name']} {run.settings.split}")
    return ["vqa_confusion.png"]
