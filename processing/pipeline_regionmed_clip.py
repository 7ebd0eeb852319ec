"""The zero-shot image-classification pipeline of RegionMed-CLIP, registered through `custom_pipelines`.

`pipeline("zero-shot-image-classification", model=DIR, trust_remote_code=True)` builds it. It
differs from transformers' pipeline in what medical users need:

* images are decoded by the RegionMed-CLIP image processor, so PIL images, NumPy arrays, file
  paths and DICOM files all work (transformers' `load_image` cannot read DICOM);
* box-free by default: the image embedding of the global view and its proposal windows;
* with `boxes=`, `masks=` or `points=` (one image's regions, in the image processor's formats) it
  returns one ranked label list per region, scored with the region embeddings.

Scores are the softmax over the candidate labels of the model's scaled cosine similarities.
"""

from collections.abc import Sequence
from typing import Any

from transformers.pipelines import ZeroShotImageClassificationPipeline

__all__ = ["RegionMedCLIPZeroShotPipeline"]

_REGION_KINDS = {"boxes": None, "masks": "mask", "points": "point"}  # argument -> the image processor's dict key


class RegionMedCLIPZeroShotPipeline(ZeroShotImageClassificationPipeline):
    """Zero-shot classification of a medical image, or of each of its regions (see the module docstring)."""

    def _sanitize_parameters(self, tokenizer_kwargs: dict | None = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        regions = {name: kwargs.pop(name) for name in _REGION_KINDS if kwargs.get(name) is not None}
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(
            tokenizer_kwargs=tokenizer_kwargs, **kwargs)
        preprocess_params.update(regions)
        return preprocess_params, forward_params, postprocess_params

    def preprocess(
        self,
        image: Any,
        candidate_labels: Sequence[str] | None = None,
        hypothesis_template: str = "There is a {}.",
        timeout: float | None = None,
        tokenizer_kwargs: dict | None = None,
        boxes: Sequence[Any] | None = None,
        masks: Sequence[Any] | None = None,
        points: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        if not candidate_labels:
            raise ValueError("candidate_labels must name at least one class")
        regions = [*(boxes or ()), *({"mask": mask} for mask in masks or ()), *({"point": point} for point in points or ())]
        inputs = self.image_processor(images=[image], regions=[regions] if regions else None, return_tensors="pt")
        inputs["candidate_labels"] = list(candidate_labels)
        texts = [hypothesis_template.format(label) for label in candidate_labels]
        inputs["text_inputs"] = [self.tokenizer(texts, return_tensors="pt", padding=True, **(tokenizer_kwargs or {}))]
        return inputs

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        candidate_labels = model_inputs.pop("candidate_labels")
        text_inputs = model_inputs.pop("text_inputs")[0]
        outputs = self.model(**text_inputs, **model_inputs)
        result = {"candidate_labels": candidate_labels, "logits": outputs.logits_per_image}
        if outputs.region_embeds is not None:
            valid = outputs.roi_mask[0].bool()
            # scaled by the model's own clamped temperature, as its image logits are
            result["region_logits"] = outputs.logit_scale * outputs.region_embeds[0][valid] @ outputs.text_embeds.t()
        return result

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        labels = model_outputs["candidate_labels"]
        logits = model_outputs.get("region_logits")
        if logits is None:
            logits = model_outputs["logits"]
        probabilities = logits.float().softmax(dim=-1)
        ranked = [sorted(({"score": score, "label": label} for score, label in zip(row.tolist(), labels, strict=True)),
                         key=lambda entry: -entry["score"]) for row in probabilities]
        return ranked if "region_logits" in model_outputs else ranked[0]
