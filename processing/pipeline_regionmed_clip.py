"""The zero-shot image-classification pipeline of RegionMed-CLIP, registered through `custom_pipelines`.

`pipeline("zero-shot-image-classification", model=DIR, trust_remote_code=True)` builds it. It
differs from transformers' pipeline in what medical users need:

* images are decoded by the RegionMed-CLIP image processor, so PIL images, NumPy arrays, file
  paths and DICOM files all work (transformers' `load_image` cannot read DICOM);
* box-free by default: the image embedding of the global view and the image processor's proposals
  (windows cut from the full-resolution image, read as regions), and, per label, `"box"`: the
  proposal where the label is most probable (each proposal classified among the candidate labels
  and the model's `background_caption`), in pixel xyxy on the original image: where the finding is;
  with `heatmap=True` also `"heatmap"`: that probability of every proposal painted back onto the
  image (`proposal_heatmap`, longer side at most 512);
* with `boxes=`, `masks=` or `points=` (one image's regions, in the image processor's formats) it
  returns one ranked label list per region, scored with the region embeddings.

Scores are the softmax over the candidate labels of the model's scaled cosine similarities.
"""

from collections.abc import Sequence
from typing import Any

from transformers.pipelines import ZeroShotImageClassificationPipeline

from .image_processing_regionmed_clip import proposal_heatmap
from .medical_image_io import load_medical_pil

__all__ = ["RegionMedCLIPZeroShotPipeline"]

_REGION_KINDS = {"boxes": None, "masks": "mask", "points": "point"}  # argument -> the image processor's dict key


class RegionMedCLIPZeroShotPipeline(ZeroShotImageClassificationPipeline):
    """Zero-shot classification of a medical image, or of each of its regions (see the module docstring)."""

    def _sanitize_parameters(self, tokenizer_kwargs: dict | None = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        regions = {name: kwargs.pop(name) for name in _REGION_KINDS if kwargs.get(name) is not None}
        heatmap = kwargs.pop("heatmap", False)
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(
            tokenizer_kwargs=tokenizer_kwargs, **kwargs)
        preprocess_params.update(regions)
        postprocess_params["heatmap"] = heatmap
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
        processor = self.image_processor
        image = load_medical_pil(image, dicom_frame=processor.dicom_frame, max_image_pixels=processor.max_image_pixels)
        inputs = processor(images=[image], regions=[regions] if regions else None, return_tensors="pt")
        texts = [hypothesis_template.format(label) for label in candidate_labels]
        if "proposal_mask" in inputs:  # where each proposal is on the original image, for the returned boxes
            inputs["proposal_pixel_boxes"] = processor.proposal_boxes(image.height, image.width)
            inputs["image_size"] = (image.height, image.width)
            texts.append(self.model.config.background_caption)  # what a proposal is when it is none of the labels
        inputs["candidate_labels"] = list(candidate_labels)
        inputs["text_inputs"] = [self.tokenizer(texts, return_tensors="pt", padding=True, **(tokenizer_kwargs or {}))]
        return inputs

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        candidate_labels = model_inputs.pop("candidate_labels")
        text_inputs = model_inputs.pop("text_inputs")[0]
        located = {key: model_inputs.pop(key) for key in ("proposal_pixel_boxes", "image_size") if key in model_inputs}
        outputs = self.model(**text_inputs, **model_inputs)
        labels = len(candidate_labels)  # the text after them is the background caption
        result = {"candidate_labels": candidate_labels, "logits": outputs.logits_per_image[:, :labels]}
        if outputs.region_embeds is not None:
            valid = outputs.roi_mask[0].bool()
            # scaled by the model's own clamped temperature, as its image logits are
            result["region_logits"] = (outputs.logit_scale * outputs.region_embeds[0][valid]
                                       @ outputs.text_embeds[:labels].t())
        if outputs.proposal_embeds is not None:
            valid = outputs.proposal_mask[0].bool()
            # (P, labels): each proposal classified among the labels and the background, at the model's temperature
            logits = outputs.logit_scale * outputs.proposal_embeds[0][valid] @ outputs.text_embeds.t()
            result["proposal_probabilities"] = logits.softmax(dim=-1)[:, :labels]
            result.update(located)
        return result

    def postprocess(self, model_outputs: dict[str, Any], heatmap: bool = False
                    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        labels = model_outputs["candidate_labels"]
        logits = model_outputs.get("region_logits")
        if logits is None:
            logits = model_outputs["logits"]
        probabilities = logits.float().softmax(dim=-1)
        entries = [[{"score": score, "label": label} for score, label in zip(row.tolist(), labels, strict=True)]
                   for row in probabilities]
        if "region_logits" not in model_outputs and "proposal_probabilities" in model_outputs:
            probabilities = model_outputs["proposal_probabilities"].float()  # (P, labels)
            boxes = model_outputs["proposal_pixel_boxes"]
            for column, entry in enumerate(entries[0]):
                entry["box"] = [float(value) for value in boxes[int(probabilities[:, column].argmax())]]
                if heatmap:
                    entry["heatmap"] = proposal_heatmap(boxes, probabilities[:, column].numpy(),
                                                        *model_outputs["image_size"])
        elif heatmap:
            raise ValueError("heatmap=True needs box-free proposals: not with boxes, masks or points, nor with an image "
                             "processor whose proposals are off")
        ranked = [sorted(row, key=lambda entry: -entry["score"]) for row in entries]
        return ranked if "region_logits" in model_outputs else ranked[0]
