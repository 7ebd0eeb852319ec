"""A probe of what a trained RegionMed-CLIP model has learned, with controls that say WHY.

Three families of numbers, each computed only from the model's forward outputs
(`image_embeds`, `region_embeds`, `text_embeds`), so the probe does not depend on model internals:

* **Box-free** (`model(**processor(images=...))`: the global view and the processor's proposals
  pooled): zero-shot classification AUROC with positive-vs-negative prompt pairs (CheXzero style),
  image<->report retrieval Recall@K, and the mean pairwise cosine of image and report embeddings
  (1.0 = the embedding has collapsed). Zero-shot is scored as `regionmed-eval zero-shot` scores it by
  default, from each class's best-matching proposal (`best_region_scores`); beside it, from the
  pooled image embedding (`zero_shot_pooled`) and from the global view alone (`box_free_image_embeds`).
* **Regions**: for every lesion box, does the region embedding prefer its true caption over a hard
  negative that changes one thing: the side (left<->right), the zone (upper<->lower) or the finding
  type? Measured with the true inputs and three controls on the processor's batch:
  `blank_crops` (the ROI crop carries nothing), `mirror_boxes` (the box coordinates point to the
  mirrored site) and `remove_box_geometry` (every box is the whole view).
* **Verdicts**: paired differences between the true condition and a control, per lesion, with a
  standard error: the crop carries the type when blanking it lowers type accuracy; the coordinates
  carry side / zone when mirroring the boxes lowers side / zone accuracy.

Units: AUROC and region accuracies are fractions in [0, 1]; Recall@K is in percent (as
`retrieval_recall_at_k`). A metric that cannot be computed (a class with no positive) is NaN in
Python and `null` in JSON.
"""

import datetime
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regionmed_clip.data.negatives import FINDINGS, apply_rule
from regionmed_clip.processing import PROPOSAL_INPUT_NAMES
from regionmed_clip.scoring import as_float_array, auroc, mean_pairwise_cosine

from .embeddings import encode_texts
from .retrieval import retrieval_recall_at_k
from .rows import EvaluationInputError, RowNeeds, decode_image, image_problem, screen_rows
from .zero_shot import DEFAULT_PROMPTS, load_prompt_templates, prompts_for

__all__ = [
    "CONDITIONS",
    "CONTROLS",
    "NEGATIVE_KINDS",
    "NO_FINDING",
    "PARTS",
    "accuracy_by_label",
    "best_region_scores",
    "proposal_class_probabilities",
    "blank_crops",
    "class_names",
    "load_region_negatives",
    "mirror_boxes",
    "model_logit_scale",
    "paired_difference",
    "region_negative_accuracy",
    "region_negative_outcomes",
    "remove_box_geometry",
    "rule_based_negatives",
    "run_probe",
    "zero_shot_auroc",
    "zero_shot_scores",
]

# -- constants (the prompt templates are evaluation/prompts/chest_xray.yaml) -----------------------

NO_FINDING = "No finding"

# Region hard-negative kinds and the `regionmed_clip.data.negatives` rule that makes each when the
# dataset has no sidecar: side = left<->right, zone = upper<->lower, type = another finding.
NEGATIVE_KINDS: tuple[str, ...] = ("side", "zone", "type")
FALLBACK_RULES: dict[str, str] = {"side": "laterality", "zone": "location", "type": "finding"}
PARTS: tuple[str, ...] = ("zero_shot", "retrieval", "regions")


# -- metrics: pure functions of scores / embeddings ----------------------------------------------


def _normalise(embeds: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeds.double(), dim=-1)


def _ensemble(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """`(P, D)` prompt embeddings -> `(D,)`: mean of the normalised rows, renormalised."""
    if prompt_embeds.ndim != 2 or prompt_embeds.shape[0] == 0:
        raise ValueError(f"prompt embeddings must be (P >= 1, D), got shape {tuple(prompt_embeds.shape)}")
    return torch.nn.functional.normalize(_normalise(prompt_embeds).mean(0), dim=-1)


def zero_shot_scores(
    image_embeds: torch.Tensor,
    positive_prompt_embeds: Mapping[str, torch.Tensor],
    negative_prompt_embeds: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per class, `cos(image, pos) - cos(image, neg)` `(N,)` (float64), where pos / neg are the
    prompt ensembles (mean of the normalised prompt embeddings, renormalised).

    image_embeds `(N, D)`; `{class: (P, D)}` positive and negative prompt embeddings (same classes).
    """
    if set(positive_prompt_embeds) != set(negative_prompt_embeds):
        raise ValueError(
            f"positive and negative prompts name different classes: {sorted(positive_prompt_embeds)} "
            f"vs {sorted(negative_prompt_embeds)}"
        )
    images = _normalise(image_embeds)
    return {
        name: images @ _ensemble(positive_prompt_embeds[name]).to(images)
        - images @ _ensemble(negative_prompt_embeds[name]).to(images)
        for name in positive_prompt_embeds
    }


def best_region_scores(
    proposal_embeds: torch.Tensor,
    proposal_mask: torch.Tensor,
    class_prompt_embeds: Mapping[str, torch.Tensor],
    background_embeds: torch.Tensor,
    logit_scale: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per class, each image's best-matching proposal: `(scores (N,), index (N,))` (float64).

    Every proposal is classified among the classes and the background: a softmax over `logit_scale x`
    its cosine with each class's prompt ensemble and with the background ensemble (the caption the
    model was trained to give a window without a lesion, `config.background_caption`). A class's
    score is its largest probability over the image's valid proposals: present if SOME region looks
    like it rather than like background or another class (multiple-instance max).

    proposal_embeds `(N, P, D)`, proposal_mask `(N, P)` bool (every image needs a valid proposal);
    `{class: (P_c, D)}` prompt embeddings; background_embeds `(P_b, D)`."""
    if proposal_embeds.ndim != 3 or proposal_mask.shape != proposal_embeds.shape[:2]:
        raise ValueError(f"proposal_embeds must be (N, P, D) with proposal_mask (N, P), got "
                         f"{tuple(proposal_embeds.shape)} and {tuple(proposal_mask.shape)}")
    if not bool(proposal_mask.any(dim=1).all()):
        raise ValueError("every image needs at least one valid proposal")
    names = list(class_prompt_embeds)
    probabilities = proposal_class_probabilities(proposal_embeds, class_prompt_embeds, background_embeds, logit_scale)
    best = probabilities.masked_fill(~proposal_mask.bool()[..., None], -1.0).max(dim=1)
    return {name: (best.values[:, column], best.indices[:, column]) for column, name in enumerate(names)}


def model_logit_scale(model: Any) -> float:
    """The model's clamped temperature (CLIP's `min(exp(logit_scale), 100)`) as a number."""
    return float(model.logit_scale.detach().exp().clamp(max=100))


def proposal_class_probabilities(
    proposal_embeds: torch.Tensor,
    class_prompt_embeds: Mapping[str, torch.Tensor],
    background_embeds: torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """`(N, P, C)` float64: each proposal's probability of each class (in `class_prompt_embeds` order)
    when it is classified among the classes and the background (see `best_region_scores`)."""
    ensembles = torch.stack([_ensemble(embeds) for embeds in class_prompt_embeds.values()] + [_ensemble(background_embeds)])
    return (logit_scale * _normalise(proposal_embeds) @ ensembles.t()).softmax(dim=-1)[..., :-1]


def zero_shot_auroc(scores: Mapping[str, Any], labels: Mapping[str, Any]) -> dict[str, Any]:
    """Per-class AUROC and the macro mean over the classes with both positives and negatives.

    scores `{class: (N,)}`, labels `{class: (N,) bool}`. Returns `{"per_class": {class: {"auroc",
    "positives", "negatives"}}, "macro_auroc", "classes_evaluated", "classes_skipped"}`;
    `macro_auroc` is NaN when no class can be evaluated.
    """
    per_class, evaluated, skipped = {}, [], []
    for name in scores:
        label_array = as_float_array(labels[name], f"labels[{name!r}]")
        value = auroc(scores[name], label_array)
        positives = int((label_array == 1.0).sum())
        per_class[name] = {"auroc": value, "positives": positives, "negatives": int(label_array.size - positives)}
        (skipped if math.isnan(value) else evaluated).append(name)
    macro = float(np.mean([per_class[name]["auroc"] for name in evaluated])) if evaluated else float("nan")
    return {"per_class": per_class, "macro_auroc": macro, "classes_evaluated": evaluated, "classes_skipped": skipped}


def region_negative_outcomes(
    region_embeds: torch.Tensor,
    true_text: torch.Tensor,
    negative_text: Mapping[str, torch.Tensor],
    negative_valid: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per lesion and kind: did the region beat the negative? `{kind: {"correct": (N,) bool,
    "valid": (N,) bool}}` plus `"all"` (beats every valid negative; valid where any kind is).

    A win is `cos(region, true) > cos(region, negative)`, strictly: a tie is a failure. Rows of
    `negative_text[kind]` where `negative_valid[kind]` is False (default: all valid) are ignored.
    """
    if region_embeds.shape != true_text.shape or region_embeds.ndim != 2:
        raise ValueError(
            f"region_embeds {tuple(region_embeds.shape)} and true_text {tuple(true_text.shape)} must both be (N, D)"
        )
    regions = _normalise(region_embeds)
    true_cos = (regions * _normalise(true_text)).sum(-1)
    outcomes: dict[str, dict[str, torch.Tensor]] = {}
    count = regions.shape[0]
    all_correct = torch.ones(count, dtype=torch.bool)
    any_valid = torch.zeros(count, dtype=torch.bool)
    for kind, negatives in negative_text.items():
        if negatives.shape != region_embeds.shape:
            raise ValueError(f"negative_text[{kind!r}] {tuple(negatives.shape)} must match region_embeds")
        valid = torch.ones(count, dtype=torch.bool)
        if negative_valid is not None and kind in negative_valid:
            valid = torch.as_tensor(negative_valid[kind], dtype=torch.bool).cpu()
            if valid.shape != (count,):
                raise ValueError(f"negative_valid[{kind!r}] must be ({count},), got {tuple(valid.shape)}")
        negative_cos = (regions * _normalise(torch.nan_to_num(negatives))).sum(-1)
        correct = (true_cos > negative_cos).cpu() & valid
        outcomes[kind] = {"correct": correct, "valid": valid}
        all_correct &= correct | ~valid
        any_valid |= valid
    outcomes["all"] = {"correct": all_correct & any_valid, "valid": any_valid}
    return outcomes


def _summarise(outcome: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    valid = outcome["valid"]
    count = int(valid.sum())
    accuracy = float(outcome["correct"][valid].double().mean()) if count else float("nan")
    return {"accuracy": accuracy, "n": count}


def accuracy_by_label(
    outcomes: Mapping[str, Mapping[str, torch.Tensor]], labels: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """`{label: {kind: {"accuracy", "n"}}}` of `region_negative_outcomes` split by each lesion's label
    (`labels[i]` for lesion i). Two look-alike labels whose type accuracies sum to ~1 mark a region
    embedding that cannot tell them apart and sits nearer one caption: the overall mean hides it."""
    names = np.asarray(labels, dtype=object)
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for label in sorted(set(labels)):
        chosen = torch.from_numpy(names == label)
        result[label] = {kind: _summarise({"correct": outcome["correct"], "valid": outcome["valid"] & chosen})
                         for kind, outcome in outcomes.items()}
    return result


def region_negative_accuracy(
    region_embeds: torch.Tensor,
    true_text: torch.Tensor,
    negative_text: Mapping[str, torch.Tensor],
    negative_valid: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """`{kind: {"accuracy": fraction of valid lesions won, "n": valid lesions}}` for every kind
    and `"all"`; accuracy is NaN when n is 0. See `region_negative_outcomes`."""
    outcomes = region_negative_outcomes(region_embeds, true_text, negative_text, negative_valid)
    return {kind: _summarise(outcome) for kind, outcome in outcomes.items()}


def paired_difference(
    correct_a: torch.Tensor, correct_b: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, Any]:
    """Accuracy of A minus accuracy of B on the same lesions, with the paired standard error
    `std(a - b) / sqrt(n)` (sample std, 0 for n < 2). `delta` is NaN when n is 0."""
    a, b = torch.as_tensor(correct_a).double(), torch.as_tensor(correct_b).double()
    if valid is not None:
        mask = torch.as_tensor(valid, dtype=torch.bool)
        a, b = a[mask], b[mask]
    count = int(a.numel())
    if count == 0:
        return {"delta": float("nan"), "se": float("nan"), "n": 0}
    diff = a - b
    se = float(diff.std(unbiased=True) / math.sqrt(count)) if count > 1 else 0.0
    return {"delta": float(diff.mean()), "se": se, "n": count}


# -- controls: pure functions on the processor's batch --------------------------------------------

CONTROLS: tuple[str, ...] = ("crops_blanked", "boxes_mirrored", "box_geometry_removed")
CONDITIONS: tuple[str, ...] = ("true", *CONTROLS)


def _check_roi_batch(batch: Mapping[str, torch.Tensor]) -> None:
    for key in ("roi_pixel_values", "roi_boxes", "roi_mask"):
        if key not in batch:
            raise KeyError(f"the batch has no {key!r}: controls need the processor's ROI outputs")


def blank_crops(
    batch: Mapping[str, torch.Tensor],
    image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
    image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
    pixel_value: int = 0,
) -> dict[str, torch.Tensor]:
    """A new batch whose every valid ROI crop is one constant image: the normalised value of a
    uniform pixel of 8-bit intensity `pixel_value` (default 0, black: the same value the image
    processor pads letterboxed crops with, so the crop shows "nothing"), per channel
    `(pixel_value / 255 - mean) / std`. Pass the image processor's `image_mean` / `image_std`.
    Padding slots, boxes, mask, pixel_values and text are left as they are.
    """
    _check_roi_batch(batch)
    out = dict(batch)
    crops = batch["roi_pixel_values"].clone()
    mean = torch.tensor(list(image_mean), dtype=torch.float64)
    std = torch.tensor(list(image_std), dtype=torch.float64)
    value = ((pixel_value / 255.0 - mean) / std).to(crops.dtype).to(crops.device)  # (3,)
    mask = batch["roi_mask"].to(torch.bool)
    crops[mask] = value[:, None, None].expand(crops.shape[2:]).clone()
    out["roi_pixel_values"] = crops
    return out


def mirror_boxes(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new batch whose every valid box is point-reflected through the view centre:
    `[x0, y0, x1, y1] -> [1 - x1, 1 - y1, 1 - x0, 1 - y0]` (left<->right and upper<->lower;
    still x0 < x1, y0 < y1). Crops, padding boxes and everything else unchanged. Its own inverse."""
    _check_roi_batch(batch)
    out = dict(batch)
    boxes = batch["roi_boxes"]
    mirrored = torch.stack([1 - boxes[..., 2], 1 - boxes[..., 3], 1 - boxes[..., 0], 1 - boxes[..., 1]], dim=-1)
    mask = batch["roi_mask"].to(torch.bool)[..., None]
    out["roi_boxes"] = torch.where(mask, mirrored, boxes)
    return out


def remove_box_geometry(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new batch whose every valid box is the whole view `[0, 0, 1, 1]`; padding boxes, crops
    and everything else unchanged."""
    _check_roi_batch(batch)
    out = dict(batch)
    boxes = batch["roi_boxes"]
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=boxes.dtype, device=boxes.device).expand_as(boxes)
    mask = batch["roi_mask"].to(torch.bool)[..., None]
    out["roi_boxes"] = torch.where(mask, whole, boxes)
    return out


# -- prompts, classes and region negatives ----------------------------------------------------------


def class_names(label_lists: Iterable[Sequence[str]]) -> list[str]:
    """The sorted class names of a dataset's `labels` column, without "No finding"."""
    return sorted({label for labels in label_lists for label in labels if label != NO_FINDING})


def rule_based_negatives(caption: str, vocabulary: Sequence[str] = FINDINGS, seed: int = 0) -> dict[str, str | None]:
    """`{side, zone, type}` hard negatives of a region caption with `regionmed_clip.data.negatives`
    rules (laterality, location, finding); None where the rule does not apply ("middle" zone has
    no zone negative). Deterministic in (caption, vocabulary, seed)."""
    return {
        kind: apply_rule(caption, rule, random.Random(f"{seed}\x1f{rule}\x1f{caption}"), vocabulary)
        for kind, rule in FALLBACK_RULES.items()
    }


def load_region_negatives(path: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Read a `region_negatives/{split}.json` sidecar into `{(image_id, region_index): record}`.

    Each record: `{"image_id", "region_index", "caption", "label", "side", "zone",
    "negatives": {"side", "zone", "type"}}`; a missing, null or empty negative means that kind is
    not available for the lesion.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EvaluationInputError(f"region negatives sidecar {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise EvaluationInputError(f"region negatives sidecar {str(path)!r} must hold a JSON list of records")
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for index, record in enumerate(records):
        where = f"{path.name}[{index}]"
        if not isinstance(record, dict) or not {"image_id", "region_index", "caption", "negatives"} <= set(record):
            raise EvaluationInputError(f"{where} needs image_id, region_index, caption and negatives")
        if not isinstance(record["region_index"], int) or record["region_index"] < 0:
            raise EvaluationInputError(f"{where}.region_index must be a non-negative int, got {record['region_index']!r}")
        if not isinstance(record["negatives"], dict):
            raise EvaluationInputError(f"{where}.negatives must be an object with side / zone / type")
        key = (str(record["image_id"]), record["region_index"])
        if key in table:
            raise EvaluationInputError(f"{where}: a second record for image {key[0]!r} region {key[1]}")
        table[key] = record
    return table


def _negative_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


# -- running a model ------------------------------------------------------------------------------------


def _load(model_dir: Path, device: torch.device, auto_class: str = "AutoModel", name: str = "--model") -> tuple[Any, Any]:
    """The model and processor of a saved folder; what cannot be loaded raises one error naming the folder."""
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoProcessor

    _check_model_dir(model_dir, name)
    try:
        model = getattr(transformers, auto_class).from_pretrained(model_dir, trust_remote_code=True)
    except (OSError, ValueError, SafetensorError) as error:
        raise OSError(f"{name} {str(model_dir)!r}: the model cannot be loaded: {_first_line(error)}") from error
    try:
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    except (OSError, ValueError) as error:  # e.g. its tokenizer files deleted
        raise OSError(f"{name} {str(model_dir)!r}: the processor (tokenizer) cannot be loaded: "
                      f"{_first_line(error)}") from error
    return model.to(device).eval(), processor


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def _check_model_dir(model_dir: Path, name: str) -> None:
    if not model_dir.is_dir():
        raise EvaluationInputError(f"{name}: model folder {str(model_dir)!r} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EvaluationInputError(f"{name}: {str(model_dir)!r} has no config.json (not a saved model folder)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{name}: {str(config_path)!r} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise EvaluationInputError(f"{name}: {str(model_dir)!r} is not a saved model folder (its config.json has no "
                              "model_type)")


def _region_plan(
    rows: Any, max_rois: int, sidecar: dict[tuple[str, int], dict[str, Any]] | None, vocabulary: Sequence[str]
) -> dict[str, Any]:
    """Per image the boxes fed to the processor (the first `max_rois`) and per kept lesion its true
    caption and side / zone / type negatives (None where unavailable)."""
    boxes, lesions = [], []
    dropped = mismatches = 0
    used_keys = set()
    for image_id, regions in zip(rows["image_id"], rows["regions"], strict=True):
        kept = regions[:max_rois]
        dropped += len(regions) - len(kept)
        boxes.append([region["bbox"] for region in kept])
        for index, region in enumerate(kept):
            if sidecar is not None:
                record = sidecar.get((image_id, index))
                if record is None:
                    caption, negatives = region["caption"], dict.fromkeys(NEGATIVE_KINDS)
                else:
                    used_keys.add((image_id, index))
                    caption = record["caption"]
                    mismatches += caption != region["caption"]
                    negatives = {kind: _negative_or_none(record["negatives"].get(kind)) for kind in NEGATIVE_KINDS}
            else:
                caption = region["caption"]
                negatives = rule_based_negatives(caption, vocabulary)
            lesions.append({"image_id": image_id, "region_index": index, "label": region["label"],
                            "caption": caption, "negatives": negatives})
    return {
        "boxes": boxes,
        "lesions": lesions,
        "dropped": dropped,
        "caption_mismatches": mismatches,
        "sidecar_records_unused": (len(sidecar) - len(used_keys)) if sidecar is not None else 0,
    }


@torch.no_grad()
def _embed_split(
    model: Any, processor: Any, rows: Any, batch_size: int, device: torch.device, boxes: list | None, want_regions: bool
) -> dict[str, Any]:
    """Box-free image embeds (the view and its proposals pooled), the view's alone, every proposal's
    (`proposal_embeds (N, P, D)` with `proposal_mask`), report embeds, and (with `want_regions`)
    region embeds `(L, D)` of every valid ROI for each condition, in lesion order."""
    image_embeds, view_embeds, proposal_embeds, proposal_masks, text_embeds, with_boxes = [], [], [], [], [], []
    region_embeds: dict[str, list[torch.Tensor]] = {condition: [] for condition in CONDITIONS}
    image_processor = processor.image_processor
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        regions = boxes[start : start + batch_size] if boxes is not None else None
        images = [decode_image(value, image_processor) for value in batch["image"]]
        inputs = processor(images=images, text=batch["report_caption"], regions=regions, proposals=False)
        pixel_values = inputs["pixel_values"].to(device)
        box_free = model(pixel_values=pixel_values, **{key: value.to(device) for key, value in processor.image_processor(
            images, proposals=True, return_tensors="pt").items() if key in PROPOSAL_INPUT_NAMES})
        image_embeds.append(box_free.image_embeds.float().cpu())
        view_embeds.append(box_free.box_free_image_embeds.float().cpu())
        proposal_embeds.append(box_free.proposal_embeds.float().cpu())
        proposal_masks.append(box_free.proposal_mask.bool().cpu())
        text_embeds.append(model(input_ids=inputs["input_ids"].to(device),
                                 attention_mask=inputs["attention_mask"].to(device)).text_embeds.float().cpu())
        if not want_regions or not bool(inputs["roi_mask"].any()):
            with_boxes.append(image_embeds[-1])  # no box to pool: the box-free embedding
            continue
        roi = {key: inputs[key] for key in ("roi_pixel_values", "roi_boxes", "roi_mask")}
        variants = {
            "true": roi,
            "crops_blanked": blank_crops(roi, image_processor.image_mean, image_processor.image_std,
                                         image_processor.pad_value),
            "boxes_mirrored": mirror_boxes(roi),
            "box_geometry_removed": remove_box_geometry(roi),
        }
        mask = roi["roi_mask"].to(torch.bool)
        for condition, variant in variants.items():
            output = model(pixel_values=pixel_values, **{key: value.to(device) for key, value in variant.items()})
            region_embeds[condition].append(output.region_embeds.float().cpu()[mask])
            if condition == "true":  # the image embedding with the true boxes pooled into it
                with_boxes.append(output.image_embeds.float().cpu())
    slots = max(chunk.shape[1] for chunk in proposal_masks)
    result = {"image_embeds": torch.cat(image_embeds), "text_embeds": torch.cat(text_embeds),
              "view_embeds": torch.cat(view_embeds),
              "proposal_embeds": torch.cat([torch.nn.functional.pad(chunk, (0, 0, 0, slots - chunk.shape[1]))
                                            for chunk in proposal_embeds]),
              "proposal_mask": torch.cat([torch.nn.functional.pad(chunk, (0, slots - chunk.shape[1]))
                                          for chunk in proposal_masks])}
    if want_regions:
        result["with_boxes_image_embeds"] = torch.cat(with_boxes)
        result["region_embeds"] = {condition: torch.cat(chunks) if chunks else torch.zeros(0, 0)
                                   for condition, chunks in region_embeds.items()}
    return result


def _retrieval(image_embeds: torch.Tensor, text_embeds: torch.Tensor, reports: list[str]) -> dict[str, Any]:
    # Only films whose report is unique in the split: with two identical reports no model can
    # tell which image a text belongs to (as regionmed_clip.apps.demo does).
    counts = Counter(reports)
    unique = torch.tensor([counts[report] == 1 for report in reports], dtype=torch.bool)
    count = int(unique.sum())
    if count == 0:
        return {"n_pairs": 0, "chance_R@1": float("nan")}
    similarity = image_embeds[unique] @ text_embeds[unique].t()
    scores = retrieval_recall_at_k(similarity, ks=(1, 5, 10))
    return {**scores, "n_pairs": count, "chance_R@1": 100.0 / count}


def _box_free(
    model: Any, processor: Any, embeds: Mapping[str, torch.Tensor], rows_meta: Mapping[str, Any],
    prompts: Mapping[str, Mapping[str, list[str]]], parts: Sequence[str], batch_size: int, device: torch.device,
) -> dict[str, Any]:
    block: dict[str, Any] = {}
    if "zero_shot" in parts:
        classes = list(prompts["positive"])
        flat = sorted({text for side in prompts.values() for texts in side.values() for text in texts})
        encoded = dict(zip(flat, encode_texts(model, processor, flat, batch_size, device), strict=True))
        positive = {name: torch.stack([encoded[text] for text in prompts["positive"][name]]) for name in classes}
        negative = {name: torch.stack([encoded[text] for text in prompts["negative"][name]]) for name in classes}
        labels = {name: torch.tensor([name in row_labels for row_labels in rows_meta["labels"]]) for name in classes}
        pooled = zero_shot_auroc(zero_shot_scores(embeds["image_embeds"], positive, negative), labels)
        block["zero_shot"] = pooled
        if "proposal_embeds" in embeds:  # box-free: each class's best-matching proposal (as regionmed-eval
            # zero-shot scores by default), with the pooled embedding and the global view alone beside it
            background = encode_texts(model, processor, [model.config.background_caption], batch_size, device)
            best = best_region_scores(embeds["proposal_embeds"], embeds["proposal_mask"], positive, background,
                                      model_logit_scale(model))
            block["zero_shot"] = zero_shot_auroc({name: value[0] for name, value in best.items()}, labels)
            block["zero_shot_pooled"] = pooled
            block["zero_shot_global_view"] = zero_shot_auroc(
                zero_shot_scores(embeds["view_embeds"], positive, negative), labels)
    if "retrieval" in parts:
        block["retrieval"] = _retrieval(embeds["image_embeds"], embeds["text_embeds"], rows_meta["reports"])
        if "view_embeds" in embeds:
            block["retrieval_global_view"] = _retrieval(embeds["view_embeds"], embeds["text_embeds"],
                                                        rows_meta["reports"])
    block["mean_pairwise_cosine"] = {
        "image": float(mean_pairwise_cosine(embeds["image_embeds"])),
        "text": float(mean_pairwise_cosine(embeds["text_embeds"])),
    }
    return block


def _regions_block(
    model: Any, processor: Any, plan: Mapping[str, Any], region_embeds: Mapping[str, torch.Tensor],
    batch_size: int, device: torch.device,
) -> tuple[dict[str, Any], dict[str, Any]]:
    lesions = plan["lesions"]
    block: dict[str, Any] = {"n_lesions": len(lesions), "lesions_dropped_over_max_rois": plan["dropped"],
                             "chance_accuracy": 0.5, "conditions": {}}
    if not lesions:
        return block, {}
    texts = sorted({lesion["caption"] for lesion in lesions}
                   | {neg for lesion in lesions for neg in lesion["negatives"].values() if neg is not None})
    encoded = dict(zip(texts, encode_texts(model, processor, texts, batch_size, device), strict=True))
    true_text = torch.stack([encoded[lesion["caption"]] for lesion in lesions])
    negative_text, negative_valid = {}, {}
    for kind in NEGATIVE_KINDS:
        values = [lesion["negatives"][kind] for lesion in lesions]
        negative_valid[kind] = torch.tensor([value is not None for value in values], dtype=torch.bool)
        negative_text[kind] = torch.stack([encoded[value] if value is not None else torch.zeros_like(true_text[0])
                                           for value in values])
    outcomes = {}
    for condition in CONDITIONS:
        embeds = region_embeds[condition]
        if embeds.shape[0] != len(lesions):
            raise RuntimeError(f"{condition}: {embeds.shape[0]} region embeddings for {len(lesions)} lesions")
        outcomes[condition] = region_negative_outcomes(embeds, true_text, negative_text, negative_valid)
        block["conditions"][condition] = {kind: _summarise(outcome) for kind, outcome in outcomes[condition].items()}
    labels = [lesion["label"] for lesion in lesions]
    block["by_label"] = {condition: accuracy_by_label(outcomes[condition], labels)
                         for condition in ("true", "crops_blanked")}
    return block, outcomes


def _verdicts(outcomes: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]) -> dict[str, Any]:
    """Paired true-minus-control differences; `holds` is True when delta > 2 standard errors."""
    checks = {
        "crop_carries_type": ("type", "crops_blanked", "the ROI crop carries the finding type"),
        "coordinates_carry_side": ("side", "boxes_mirrored", "the box coordinates carry the side (left/right)"),
        "coordinates_carry_zone": ("zone", "boxes_mirrored", "the box coordinates carry the zone (upper/lower)"),
        "box_geometry_carries_side": ("side", "box_geometry_removed", "removing box geometry costs side accuracy"),
        "box_geometry_carries_zone": ("zone", "box_geometry_removed", "removing box geometry costs zone accuracy"),
    }
    verdicts: dict[str, Any] = {"rule": "holds when (true - control) accuracy > 2 paired standard errors"}
    for name, (kind, control, claim) in checks.items():
        if not outcomes:
            verdicts[name] = {"kind": kind, "control": control, "delta": float("nan"), "se": float("nan"), "n": 0,
                              "holds": None, "statement": f"no lesions: cannot say whether {claim}"}
            continue
        true, other = outcomes["true"][kind], outcomes[control][kind]
        diff = paired_difference(true["correct"], other["correct"], true["valid"])
        holds = None if diff["n"] == 0 else bool(diff["delta"] > 2 * diff["se"] and diff["delta"] > 0)
        if holds is None:
            statement = f"no lesion has a {kind} negative: cannot say whether {claim}"
        else:
            statement = (f"{'YES' if holds else 'NOT SHOWN'}: {claim} ({kind} accuracy true - {control} = "
                         f"{diff['delta']:+.3f} +/- {diff['se']:.3f}, n={diff['n']})")
        verdicts[name] = {"kind": kind, "control": control, **diff, "holds": holds, "statement": statement}
    return verdicts


def _load_rows(data_dir: Path, split: str, limit: int | None, decode_images: bool = True) -> Any:
    from datasets.exceptions import DatasetNotFoundError

    from regionmed_clip.data.schema import load_canonical

    if not data_dir.is_dir():
        raise EvaluationInputError(f"--data: folder {str(data_dir)!r} does not exist")
    if limit is not None and limit <= 0:
        raise EvaluationInputError(f"--limit must be positive, got {limit}")
    try:
        rows = load_canonical(data_dir, split, decode_images=decode_images)
    except (FileNotFoundError, DatasetNotFoundError) as error:
        raise EvaluationInputError(f"--data: {error}") from None
    except ValueError as error:
        if f"split {split!r} not found" in str(error):
            raise EvaluationInputError(f"--split: {error}") from None
        raise ValueError(f"--data: {error}") from None  # a shard that is there but not canonical
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    if len(rows) == 0:
        raise EvaluationInputError(f"--split: split {split!r} of {str(data_dir)!r} is empty")
    return rows


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EvaluationInputError(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError(f"--device {device!r}: CUDA is not available on this machine")
    return resolved


def run_probe(
    model_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    batch_size: int = 64,
    limit: int | None = None,
    baseline_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
    parts: Sequence[str] = PARTS,
    device: str | torch.device | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the probe; returns the report dict (see the module docstring and `evaluation/cli.py`).

    `parts` picks among "zero_shot", "retrieval", "regions"; `classes` overrides the class names
    (default: the split's `labels` without "No finding"). `device` defaults to CUDA when available.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise EvaluationInputError(f"parts must be a non-empty subset of {PARTS}, got {list(parts)}")
    if batch_size <= 0:
        raise EvaluationInputError(f"--batch-size must be positive, got {batch_size}")
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    _check_model_dir(model_dir, "--model")
    if baseline_dir is not None:
        baseline_dir = Path(baseline_dir)
        _check_model_dir(baseline_dir, "--baseline")
    rows = _load_rows(data_dir, split, limit, decode_images=False)
    device = _resolve_device(device)
    model, processor = _load(model_dir, device)

    # the usable rows (the others skipped and counted, as the tasks do), as plain lists read once
    image_processor = processor.image_processor
    checks = [image_problem(value, image_processor) for start in range(0, len(rows), batch_size)
              for value in rows[start : start + batch_size]["image"]]
    needs = RowNeeds(texts=("report_caption",), labels="zero_shot" in parts, regions="regions" in parts,
                     region_caption=True, region_label=True)
    screened = screen_rows(list(rows.remove_columns("image")), checks, needs, image_processor,
                           lambda: f"split {split!r} of {str(data_dir)!r}")
    rows = rows if len(screened.indices) == len(rows) else rows.select(screened.indices)
    meta = screened.meta
    rows_meta = {"labels": [row["labels"] or [] for row in meta], "reports": [row["report_caption"] for row in meta],
                 "image_ids": [row["image_id"] for row in meta], "regions": [row["regions"] or [] for row in meta]}
    class_list = list(classes) if classes is not None else class_names(rows_meta["labels"])
    if classes is not None and (not class_list or any(not name.strip() for name in class_list)):
        raise EvaluationInputError(f"--classes must name at least one non-empty class, got {list(classes)}")
    known = {label for labels in rows_meta["labels"] for label in labels}
    if classes is not None and "zero_shot" in parts and (unknown := [name for name in class_list if name not in known]):
        raise EvaluationInputError(f"--classes: {unknown} not among the split's labels ({sorted(known)})")
    if "zero_shot" in parts and not class_list:
        raise EvaluationInputError(f"--split: split {split!r} has no labels other than {NO_FINDING!r}; pass --classes")
    templates = load_prompt_templates(DEFAULT_PROMPTS)
    prompts = prompts_for(templates, class_list)

    want_regions = "regions" in parts
    plan = None
    sidecar_path = data_dir / "region_negatives" / f"{split}.json"
    if want_regions:
        sidecar = load_region_negatives(sidecar_path) if sidecar_path.is_file() else None
        vocabulary = sorted({region["label"] for regions in rows_meta["regions"] for region in regions})
        plan = _region_plan({"image_id": rows_meta["image_ids"], "regions": rows_meta["regions"]},
                            processor.image_processor.max_rois, sidecar, vocabulary if len(vocabulary) >= 2 else FINDINGS)
    embeds = _embed_split(model, processor, rows, batch_size, device, plan["boxes"] if plan else None, want_regions)

    box_free_parts = [part for part in parts if part != "regions"]
    report: dict[str, Any] = {
        "metadata": {
            "model": str(model_dir.resolve()),
            "data": str(data_dir.resolve()),
            "split": split,
            "n_images": len(rows),
            "n_lesions": len(plan["lesions"]) if plan else None,
            "parts": list(parts),
            "classes": class_list,
            "prompts": {"templates": str(DEFAULT_PROMPTS.name), **prompts},
            "units": {"auroc": "fraction", "region_accuracy": "fraction", "recall": "percent"},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command if command is not None else " ".join(sys.argv),
            "device": str(device),
            "batch_size": batch_size,
            "limit": limit,
            "rows": screened.skips.to_dict(),
        }
    }
    if box_free_parts:
        report["box_free"] = _box_free(model, processor, embeds, rows_meta, prompts, box_free_parts, batch_size, device)
    if want_regions:
        report["metadata"]["region_negatives"] = {
            "source": str(sidecar_path) if sidecar_path.is_file() else "rule-based (regionmed_clip.data.negatives.apply_rule:"
            " side=laterality, zone=location, type=finding)",
            "sidecar_caption_mismatches": plan["caption_mismatches"],
            "sidecar_records_unused": plan["sidecar_records_unused"],
        }
        if box_free_parts:  # do user-given boxes still help the image-level tasks? the same figures with them
            report["with_boxes"] = _box_free(
                model, processor, {"image_embeds": embeds["with_boxes_image_embeds"], "text_embeds": embeds["text_embeds"]},
                rows_meta, prompts, box_free_parts, batch_size, device)
        block, outcomes = _regions_block(model, processor, plan, embeds["region_embeds"], batch_size, device)
        report["regions"] = block
        report["verdicts"] = _verdicts(outcomes)
    del model

    if baseline_dir is not None and box_free_parts:
        base_model, base_processor = _load(baseline_dir, device, name="--baseline")
        base_embeds = _embed_split(base_model, base_processor, rows, batch_size, device, None, False)
        base_block = _box_free(base_model, base_processor, base_embeds, rows_meta, prompts, box_free_parts,
                               batch_size, device)
        differences = {}
        if "zero_shot" in box_free_parts:  # against the ablation's pooled embedding: a global-only model has no region path
            differences["macro_auroc"] = (report["box_free"]["zero_shot"]["macro_auroc"]
                                          - base_block["zero_shot_pooled"]["macro_auroc"])
        if "retrieval" in box_free_parts and report["box_free"]["retrieval"]["n_pairs"]:
            for key in ("image_to_text_R@1", "text_to_image_R@1"):
                differences[key] = report["box_free"]["retrieval"][key] - base_block["retrieval"][key]
        report["baseline"] = {"model": str(baseline_dir.resolve()), "box_free": base_block,
                              "differences_model_minus_baseline": differences}
    return report
