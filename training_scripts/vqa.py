"""`regionmed-train-vqa`: fine-tune `RegionMedCLIPForVQA` from a pretrained RegionMed-CLIP folder.

    regionmed-train-vqa --model RUN/final --data DATA --output-dir OUT [--max-steps 600] [--batch-size 32]
                        [--learning-rate 1e-3] [--backbone-lr-scale 0.1] [--regions] [--seed 0]
                        [any transformers.TrainingArguments field as a flag, e.g. --gradient-accumulation-steps 2]

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

import collections
import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, Trainer, TrainingArguments

from regionmed_clip.cli import UsageError, console_script, folder, model_folder, output_folder
from regionmed_clip.data.schema import dataset_output, load_canonical
from regionmed_clip.data.vqa import VQAExample, load_vqa_examples
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPForVQA
from regionmed_clip.scoring import normalize_answer

from .arguments import TrainingCommandParser

__all__ = ["IGNORE_INDEX", "RegionMedCLIPVQATrainer", "VQACollator", "answer_vocabulary", "build_vqa_trainer", "main"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # cross-entropy's ignore index: a question whose answer is outside the answer set
DEFAULT_VQA_ARGS: dict[str, Any] = {
    "max_steps": 600,
    "seed": 0,
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


@dataclasses.dataclass
class VQAOptions:
    """`regionmed-train-vqa`'s own options; every `TrainingArguments` field is a flag besides (`arguments.py`)."""

    model: Path = dataclasses.field(metadata={"help": "pretrained RegionMed-CLIP folder"})
    data: Path = dataclasses.field(metadata={"help": "canonical dataset with vqa/train.json"})
    backbone_lr_scale: float = dataclasses.field(default=0.1, metadata={"help": "0 freezes the backbone"})
    regions: bool = dataclasses.field(default=False, metadata={"help": "give the dataset's boxes as ROI inputs"})


def parse_command(argv: Sequence[str] | None = None) -> tuple[VQAOptions, dict[str, Any]]:
    """`regionmed-train-vqa`'s command line -> `(options, the TrainingArguments flags given)`; those win over
    `DEFAULT_VQA_ARGS` in `build_vqa_trainer`. `--output-dir` is required."""
    parser = TrainingCommandParser("regionmed-train-vqa", __doc__, VQAOptions,
                                   types={"model": model_folder, "data": folder, "output_dir": output_folder},
                                   shorthands={"--batch-size": "per_device_train_batch_size"})
    options, flags = parser.parse(argv)
    if "output_dir" not in flags:
        raise UsageError("--output-dir is required")
    return options, flags


def _check_arguments(args: VQAOptions, training_args: Mapping[str, Any]) -> None:
    """UsageError naming the first argument whose value cannot work (before any model is loaded)."""
    learning_rate = training_args.get("learning_rate", DEFAULT_VQA_ARGS["learning_rate"])
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise UsageError(f"--learning-rate must be a positive number, got {learning_rate}")
    if not 0.0 <= args.backbone_lr_scale <= 1.0:
        raise UsageError(f"--backbone-lr-scale must be in [0, 1] (0 freezes the backbone), got {args.backbone_lr_scale}")
    final = training_args["output_dir"] / "final"
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UsageError(f"--output-dir {str(training_args['output_dir'])!r} already holds a trained model (final/): "
                         "train into a new folder")


@console_script("regionmed-train-vqa")
def main(argv: list[str] | None = None) -> int:
    args, training_args = parse_command(argv)
    _check_arguments(args, training_args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output_dir = training_args.pop("output_dir")
    trainer, processor = build_vqa_trainer(args.model, args.data, output_dir, training_args,
                                           args.backbone_lr_scale, args.regions)
    trainer.train()
    final = output_dir / "final"
    with dataset_output(final) as staging:  # a half-written final/ never looks like a trained model
        trainer.model.save_pretrained(staging)  # no training_args.bin pickle beside the weights
        processor.save_pretrained(staging)
    (output_dir / "train_log.jsonl").write_text(
        "".join(json.dumps(entry) + "\n" for entry in trainer.state.log_history))
    print(f"VQA model: {final} ({trainer.model.config.num_labels} answers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
