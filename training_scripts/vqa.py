"""`regionmed-train-vqa`: fine-tune `RegionMedCLIPForVQA` from a pretrained RegionMed-CLIP folder.

    regionmed-train-vqa --model RUN/final --data DATA --output-dir OUT [--max-steps 600] [--batch-size 32]
                        [--learning-rate 1e-3] [--backbone-lr-scale 0.1] [--regions] [--seed 0]

The answer set is the training split's answers after `regionmed_clip.scoring.normalize_answer` (closed
yes / no and open answers alike), most frequent first; it becomes the model's `id2label`. The
backbone (both towers, the ROI processor, the projections) trains at `backbone_lr_scale` times the
head's learning rate, so a small VQA set adapts the fusion head without erasing the contrastive
alignment; 0 freezes it. The box-free centre of the pretrained model is kept as it is. With
`--regions` the dataset's boxes are given to the model as ROI inputs (region tokens); without,
the image is its box-free embedding and global patch tokens. `OUT/final/` holds the model and
processor (`AutoModelForVisualQuestionAnswering` / `AutoProcessor` with `trust_remote_code`), written
into a hidden folder and renamed to `final/` once complete; an output folder that already holds a
`final/` is refused before training starts.
"""

import argparse
import collections
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, Trainer, TrainingArguments

from regionmed_clip.cli import UsageError, console_script, folder, model_folder, output_folder, positive_int
from regionmed_clip.data.schema import dataset_output, load_canonical
from regionmed_clip.data.vqa import VQAExample, load_vqa_examples
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPForVQA
from regionmed_clip.scoring import normalize_answer

__all__ = ["IGNORE_INDEX", "RegionMedCLIPVQATrainer", "VQACollator", "answer_vocabulary", "build_vqa_trainer", "main"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # cross-entropy's ignore index: a question whose answer is outside the answer set
DEFAULT_VQA_ARGS: dict[str, Any] = {
    "per_device_train_batch_size": 32,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "logging_steps": 20,
    "save_strategy": "no",
    "report_to": "none",
    "remove_unused_columns": False,  # the collator reads the examples itself
    "dataloader_num_workers": 0,
    "max_grad_norm": 1.0,
}


def answer_vocabulary(examples: Sequence[VQAExample]) -> list[str]:
    """The normalised answers of `examples`, most frequent first (ties alphabetical)."""
    counts = collections.Counter(normalize_answer(example.answer) for example in examples)
    counts.pop("", None)
    return sorted(counts, key=lambda answer: (-counts[answer], answer))


def split_rows(data_dir: str | Path, split: str, image_ids: set[str]) -> dict[str, dict[str, Any]]:
    """`{image_id: {"image": PIL image, "boxes": [[x0, y0, x1, y1], ...]}}` for the ids asked for;
    raises naming an id the split lacks."""
    rows = load_canonical(data_dir, split, decode_images=False)
    keep = [index for index, image_id in enumerate(rows["image_id"]) if image_id in image_ids]
    missing = image_ids - {rows[index]["image_id"] for index in keep}
    if missing:
        raise ValueError(f"split {split!r} of {str(data_dir)!r} has no image {sorted(missing)[0]!r} "
                         f"({len(missing)} VQA image ids missing)")
    selected = load_canonical(data_dir, split).select(keep)
    return {row["image_id"]: {"image": row["image"], "boxes": [region["bbox"] for region in row["regions"]]}
            for row in selected}


class VQACollator:
    """VQA examples -> model inputs: `pixel_values (B, 3, H, W)`, the questions' `input_ids` /
    `attention_mask (B, L)`, `labels (B,)` (`IGNORE_INDEX` for an answer outside `label2id`), and with
    `use_regions` the ROI inputs of each image's boxes."""

    def __init__(self, processor: Any, label2id: Mapping[str, int], rows: Mapping[str, Mapping[str, Any]],
                 use_regions: bool = False):
        self.processor = processor
        self.label2id = dict(label2id)
        self.rows = rows
        self.use_regions = use_regions

    def __call__(self, examples: Sequence[VQAExample]) -> dict[str, torch.Tensor]:
        images = [self.rows[example.image_id]["image"] for example in examples]
        regions = [self.rows[example.image_id]["boxes"] for example in examples] if self.use_regions else None
        inputs = self.processor(images=images, text=[example.question for example in examples], regions=regions,
                                proposals=False)  # the VQA head reads the view (and given boxes), not proposals
        batch = {key: inputs[key] for key in ("pixel_values", "input_ids", "attention_mask")}
        if self.use_regions:
            batch.update({key: inputs[key] for key in ("roi_pixel_values", "roi_boxes", "roi_mask")})
        batch["labels"] = torch.tensor([self.label2id.get(normalize_answer(example.answer), IGNORE_INDEX)
                                        for example in examples])
        return batch


class RegionMedCLIPVQATrainer(Trainer):
    """A Trainer whose optimizer gives the pretrained backbone `backbone_lr_scale` times the learning
    rate of the new head (0 freezes the backbone)."""

    def __init__(self, *args: Any, backbone_lr_scale: float = 0.1, **kwargs: Any):
        if not 0.0 <= backbone_lr_scale <= 1.0:
            raise ValueError(f"backbone_lr_scale must be in [0, 1], got {backbone_lr_scale}")
        self.backbone_lr_scale = backbone_lr_scale
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            backbone = {id(parameter) for parameter in model.regionmed_clip.parameters()}
            if self.backbone_lr_scale == 0:
                for parameter in model.regionmed_clip.parameters():
                    parameter.requires_grad_(False)
            groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    # no weight decay on biases, norms and gates (as transformers' default grouping)
                    decay = parameter.ndim >= 2 and "norm" not in name
                    groups.setdefault((id(parameter) in backbone, decay), []).append(parameter)
            learning_rate, weight_decay = self.args.learning_rate, self.args.weight_decay
            optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_class(
                [{"params": params, "weight_decay": weight_decay if decay else 0.0,
                  "lr": learning_rate * (self.backbone_lr_scale if in_backbone else 1.0)}
                 for (in_backbone, decay), params in groups.items()],
                lr=learning_rate, **optimizer_kwargs)
        return self.optimizer


def build_vqa_trainer(
    model_dir: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    training_args: Mapping[str, Any] | None = None,
    backbone_lr_scale: float = 0.1,
    use_regions: bool = False,
) -> tuple[RegionMedCLIPVQATrainer, Any]:
    """The trainer (model initialised from the RegionMed-CLIP folder `model_dir`, answer set from the
    training split) and the processor."""
    examples = load_vqa_examples(data_dir, "train")
    if not examples:
        raise ValueError(f"{str(data_dir)!r} has no training questions (vqa/train.json is empty)")
    answers = answer_vocabulary(examples)
    if not answers:
        raise ValueError(f"{str(data_dir)!r}: every answer of vqa/train.json is empty after normalisation")
    try:
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--model {str(model_dir)!r}: the processor / tokenizer files do not load "
                         f"(save the processor beside the model): {error}") from error
    try:
        model = RegionMedCLIPForVQA.from_pretrained(
            model_dir, id2label=dict(enumerate(answers)),
            label2id={answer: index for index, answer in enumerate(answers)}, box_free_center_momentum=0.0)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--model {str(model_dir)!r}: the model does not load: {error}") from error
    rows = split_rows(data_dir, "train", {example.image_id for example in examples})
    args = TrainingArguments(**{**DEFAULT_VQA_ARGS, **(training_args or {}), "output_dir": str(output_dir)})
    trainer = RegionMedCLIPVQATrainer(
        model=model, args=args, train_dataset=examples,
        data_collator=VQACollator(processor, model.config.label2id, rows, use_regions),
        backbone_lr_scale=backbone_lr_scale)
    return trainer, processor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-train-vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=model_folder, required=True, help="pretrained RegionMed-CLIP folder")
    parser.add_argument("--data", type=folder, required=True, help="canonical dataset with vqa/train.json")
    parser.add_argument("--output-dir", type=output_folder, required=True)
    parser.add_argument("--max-steps", type=positive_int, default=600)
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_VQA_ARGS["per_device_train_batch_size"])
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_VQA_ARGS["learning_rate"])
    parser.add_argument("--backbone-lr-scale", type=float, default=0.1, help="0 freezes the backbone")
    parser.add_argument("--regions", action="store_true", help="give the dataset's boxes as ROI inputs")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """UsageError naming the first argument whose value cannot work (before any model is loaded)."""
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise UsageError(f"--learning-rate must be a positive number, got {args.learning_rate}")
    if not 0.0 <= args.backbone_lr_scale <= 1.0:
        raise UsageError(f"--backbone-lr-scale must be in [0, 1] (0 freezes the backbone), got {args.backbone_lr_scale}")
    final = args.output_dir / "final"
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UsageError(f"--output-dir {str(args.output_dir)!r} already holds a trained model (final/): "
                         "train into a new folder")


@console_script("regionmed-train-vqa")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trainer, processor = build_vqa_trainer(
        args.model, args.data, args.output_dir,
        {"max_steps": args.max_steps, "per_device_train_batch_size": args.batch_size,
         "learning_rate": args.learning_rate, "seed": args.seed},
        args.backbone_lr_scale, args.regions)
    trainer.train()
    final = args.output_dir / "final"
    with dataset_output(final) as staging:  # a half-written final/ never looks like a trained model
        trainer.model.save_pretrained(staging)  # no training_args.bin pickle beside the weights
        processor.save_pretrained(staging)
    (args.output_dir / "train_log.jsonl").write_text(
        "".join(json.dumps(entry) + "\n" for entry in trainer.state.log_history))
    print(f"VQA model: {final} ({trainer.model.config.num_labels} answers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
