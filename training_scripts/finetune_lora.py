"""`regionmed-finetune`: PEFT LoRA fine-tuning of a saved RegionMed-CLIP folder with the staged Trainer.

    regionmed-finetune --model RUN/final --data DATA --output-dir OUT [--towers vision,text]
                       [--layers attention,mlp,projections,context] [--rank 8] [--alpha 16] [--dropout 0.05]
                       [--modules-to-save roi_processor] [--max-steps 300] [--batch-size 32] [--learning-rate 1e-2]
                       [--config RUN.yaml] [--schedule joint|progressive] [--merge]
                       [any transformers.TrainingArguments field as a flag]

Training arguments merge as regionmed-train's do (its defaults, then this command's: 300 steps, learning rate
1e-2, seed 0, no checkpoints; then the YAML's `training_args`; then the flags given). Activation checkpointing
is TrainingArguments': `--activation-checkpointing`, reentrant with
`--activation-checkpointing-kwargs '{"use_reentrant": true}'` (the frozen towers then get input gradients,
so that the LoRA layers inside them learn).

LoRA adapters go on the linear layers `--layers` names (`lora_target_regex`, exact module names): the
attention projections (q / k / v / out) and the MLP (fc1 / fc2) of the chosen towers' encoder layers, the
text projection, and the dense head the box-free path pools windows through
(`roi_processor.context_projection`); with `projections` the visual projection is trained whole (the model
reads its weight directly). `--modules-to-save roi_processor` trains the ROI processor whole.
PEFT's `task_type` is None: RegionMed-CLIP is no PEFT task model. Training is `regionmed-train`'s (the run
YAML's schedule and loss weights, or the default stage) starting from the saved folder; the box-free
centre is held at the base's value, so the model trained is exactly base + adapter. Writes
`OUT/adapter/` (`adapter_config.json`, `adapter_model.safetensors`), `OUT/lora_summary.json` (trainable
parameters and share) and, with `--merge`, `OUT/merged/`: the adapter merged into the weights, a plain
model + processor folder that loads with `AutoModel.from_pretrained(..., trust_remote_code=True)`.

Reload an adapter onto the remote-code model (`AutoPeftModel` cannot: it knows only PEFT's task
classes and transformers' own architectures, not remote code):

    base = AutoModel.from_pretrained(BASE, trust_remote_code=True)
    model = PeftModel.from_pretrained(base, "OUT/adapter")
"""

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model

from regionmed_clip.cli import UsageError, console_script, folder, fraction, model_folder, output_folder, positive_int
from regionmed_clip.data.schema import dataset_output
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPModel
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, load_tokenizer

from .arguments import TrainingCommandParser
from .schedule import NAMED_SCHEDULES
from .train import DEFAULT_TRAINING_ARGS, build_trainer, check_training_args, read_run_yaml, schedule_of

__all__ = ["ADAPTED_LAYERS", "DEFAULT_LAYERS", "ENCODER_LAYERS", "HEAD_LAYERS", "SAVABLE_MODULES",
           "TOWERS", "lora_config", "lora_target_regex", "main", "merge_adapter"]

TOWERS: dict[str, str] = {"vision": "vision_model", "text": "text_model"}  # --towers name -> module prefix
# --layers name -> the linear layers that get adapters: in each encoder layer of a tower ...
ENCODER_LAYERS: dict[str, str] = {"attention": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)", "mlp": r"mlp\.(fc1|fc2)"}
# ... or outside the encoders, per tower: the text projection and the dense head the box-free path pools
# windows through. Adapted with LoRA, not saved whole: PEFT picks `modules_to_save` by name suffix, and
# `text_projection` also caught `roi_processor.context_projection` (trained unasked; a saved ROI processor
# then held it twice and no longer loaded).
HEAD_LAYERS: dict[str, dict[str, str]] = {
    "projections": {"text": "text_projection"},
    "context": {"vision": r"roi_processor\.context_projection"},
}
# The visual projection is trained whole with "projections" (no other module's name ends in it): the model
# reads its weight directly, to project in float32, which a LoRA layer around it would not change.
WHOLE_PROJECTIONS: dict[str, str] = {"vision": "visual_projection"}
ADAPTED_LAYERS = (*ENCODER_LAYERS, *HEAD_LAYERS)
DEFAULT_LAYERS = ("attention", "mlp", "projections", "context")
SAVABLE_MODULES: dict[str, list[str]] = {"roi_processor": ["roi_processor"]}  # --modules-to-save: trained whole
# Measured on the tiny preset from 300-step bases, two bases (benchmarks/results/bench_finetune_grid2.json):
# box-free AUROC +0.04 and retrieval R@5 +11 points at 1e-2 over 1e-3 with the default layers; larger presets
# were not measured.
DEFAULT_LEARNING_RATE = 1e-2


def lora_target_regex(towers: Sequence[str], layers: Sequence[str] = DEFAULT_LAYERS) -> str:
    """A regex PEFT matches against whole module names: the `layers` (`ADAPTED_LAYERS`) of `towers`."""
    unknown = sorted(set(towers) - set(TOWERS))
    if unknown or not towers:
        raise ValueError(f"--towers must be among {sorted(TOWERS)}, got {list(towers)}")
    unknown = sorted(set(layers) - set(ADAPTED_LAYERS))
    if unknown or not layers:
        raise ValueError(f"--layers must be among {list(ADAPTED_LAYERS)}, got {list(layers)}")
    alternatives = []
    encoder = [ENCODER_LAYERS[layer] for layer in layers if layer in ENCODER_LAYERS]
    if encoder:
        prefixes = "|".join(TOWERS[tower] for tower in towers)
        alternatives.append(rf"({prefixes})\.encoder\.layers\.\d+\.({'|'.join(encoder)})")
    alternatives += [HEAD_LAYERS[layer][tower] for layer in layers if layer in HEAD_LAYERS
                     for tower in towers if tower in HEAD_LAYERS[layer]]
    if not alternatives:
        raise ValueError(f"--layers {list(layers)} name no layer of --towers {list(towers)}")
    return rf"^({'|'.join(alternatives)})$"


def lora_config(towers: Sequence[str], rank: int = 8, alpha: int = 16, dropout: float = 0.05,
                modules_to_save: Sequence[str] = (), layers: Sequence[str] = DEFAULT_LAYERS) -> LoraConfig:
    if "projections" in modules_to_save:
        raise ValueError("--modules-to-save projections: the projections now get LoRA adapters (--layers "
                         "projections, a default), since PEFT's suffix match of 'text_projection' also caught "
                         "roi_processor.context_projection")
    unknown = sorted(set(modules_to_save) - set(SAVABLE_MODULES))
    if unknown:
        raise ValueError(f"--modules-to-save must be among {sorted(SAVABLE_MODULES)}, got {list(modules_to_save)}")
    saved = [module for name in modules_to_save for module in SAVABLE_MODULES[name]]
    if "projections" in layers:
        saved += [WHOLE_PROJECTIONS[tower] for tower in towers if tower in WHOLE_PROJECTIONS]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_regex(towers, layers),
                      modules_to_save=saved or None, task_type=None)


@contextlib.contextmanager
def _peft_reading_deprecated_checkpointing_flag() -> Iterator[None]:
    """Wrapping a model in `PeftModel` reads transformers' deprecated `is_gradient_checkpointing`: a
    FutureWarning per run that a user cannot act on (PEFT's call, not theirs or ours)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, output_dir: str | Path) -> Path:
    """The base folder's model with the adapter merged into its weights, saved with its processor as a
    plain RegionMed-CLIP folder (remote code, `auto_map`)."""
    with _peft_reading_deprecated_checkpointing_flag():
        model = PeftModel.from_pretrained(RegionMedCLIPModel.from_pretrained(base_dir), str(adapter_dir))
    model = model.merge_and_unload()
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor.from_pretrained(base_dir), load_tokenizer(base_dir))
    with dataset_output(output_dir) as staging:  # a half-written folder never looks like a model
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(output_dir)


def _trainable(model: Any) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": trainable, "all_parameters": total, "trainable_share": trainable / total}


@dataclasses.dataclass
class FinetuneOptions:
    """`regionmed-finetune`'s own options; every `TrainingArguments` field is a flag besides (`arguments.py`)."""

    model: Path = dataclasses.field(metadata={"help": "saved RegionMed-CLIP folder"})
    data: Path = dataclasses.field(metadata={"help": "canonical dataset folder"})
    towers: str = dataclasses.field(default="vision,text", metadata={"help": "comma-separated among vision, text"})
    layers: str = dataclasses.field(default=",".join(DEFAULT_LAYERS), metadata={
        "help": f"comma-separated among {list(ADAPTED_LAYERS)}: which linear layers get adapters (the encoders' "
                "attention and MLP, the embedding projections, the box-free dense head)"})
    rank: int = 8
    alpha: int = 16
    dropout: float = dataclasses.field(default=0.05, metadata={"help": "LoRA dropout, in [0, 1)"})
    modules_to_save: str = dataclasses.field(default="none", metadata={
        "help": f"comma-separated among {sorted(SAVABLE_MODULES)} (trained whole), or 'none'"})
    config: Path | None = dataclasses.field(default=None, metadata={"help": "run YAML: schedule and training_args"})
    schedule: str | None = dataclasses.field(default=None, metadata={
        "choices": sorted(NAMED_SCHEDULES), "help": "a named schedule (default: the YAML's `schedule`, else joint)"})
    merge: bool = dataclasses.field(default=False, metadata={"help": "also write the merged model to OUT/merged"})


# This command's training defaults over regionmed-train's (`DEFAULT_TRAINING_ARGS`); the YAML and flags win.
FINETUNE_TRAINING_ARGS: dict[str, Any] = {"max_steps": 300, "learning_rate": DEFAULT_LEARNING_RATE, "seed": 0,
                                          "save_strategy": "no"}


def parse_command(argv: Sequence[str] | None = None) -> tuple[FinetuneOptions, dict[str, Any]]:
    """`regionmed-finetune`'s command line -> `(options, the TrainingArguments flags given)`."""
    parser = TrainingCommandParser(
        "regionmed-finetune", __doc__, FinetuneOptions,
        types={"model": model_folder, "data": folder, "output_dir": output_folder, "rank": positive_int,
               "alpha": positive_int, "dropout": fraction},
        shorthands={"--batch-size": "per_device_train_batch_size"})
    options, flags = parser.parse(argv)
    if "output_dir" not in flags:
        raise UsageError("--output-dir is required")
    return options, flags


def checkpointing_mode(training_args: Mapping[str, Any]) -> str:
    """"off", "reentrant" or "non-reentrant", from TrainingArguments' activation checkpointing fields (or their
    `gradient_checkpointing*` aliases); transformers' default is non-reentrant."""
    enabled = training_args.get("activation_checkpointing", training_args.get("gradient_checkpointing"))
    if not enabled:
        return "off"
    kwargs = training_args.get("activation_checkpointing_kwargs",
                               training_args.get("gradient_checkpointing_kwargs")) or {}
    if isinstance(kwargs, str):  # a JSON flag value; TrainingArguments parses it the same way
        kwargs = json.loads(kwargs)
    return "reentrant" if kwargs.get("use_reentrant", False) else "non-reentrant"


@console_script("regionmed-finetune")
def main(argv: list[str] | None = None) -> int:
    args, training_flags = parse_command(argv)
    output_dir = training_flags["output_dir"]
    earlier = [output_dir / name for name in ("adapter", "merged") if (output_dir / name).exists()]
    if earlier:
        raise UsageError(f"--output-dir {str(output_dir)!r} holds an earlier fine-tune ({', '.join(path.name for path in earlier)}): "
                         "choose a new folder, or delete it first")
    saved = [] if args.modules_to_save == "none" else [name.strip() for name in args.modules_to_save.split(",")]
    try:
        config = lora_config([tower.strip() for tower in args.towers.split(",")], args.rank, args.alpha,
                             args.dropout, saved, [layer.strip() for layer in args.layers.split(",")])
    except ValueError as error:
        raise UsageError(str(error)) from None
    run_yaml = read_run_yaml(args.config)
    check_training_args(run_yaml.get("training_args") or {}, f"--config {str(args.config)!r}")
    training_args = {**DEFAULT_TRAINING_ARGS, **FINETUNE_TRAINING_ARGS, **(run_yaml.get("training_args") or {}),
                     **training_flags, "output_dir": str(output_dir)}
    checkpointing = checkpointing_mode(training_args)
    run = {"model": {"pretrained": str(args.model)}, "data": {"path": str(args.data), "split": "train"},
           "schedule": schedule_of(args, run_yaml), "training_args": training_args}
    def wrap(model: RegionMedCLIPModel) -> PeftModel:
        # The box-free centre is a buffer the adapter does not save: held at the base's value, the model
        # trained here is exactly base + adapter (measured: re-estimating it moved AUROC by 0.002).
        model.config.box_free_center_momentum = 0.0
        if checkpointing == "reentrant":
            # Reentrant checkpointing back-propagates only through segments whose input requires grad;
            # with the towers frozen, none would, and no LoRA layer inside them would learn.
            model.enable_input_require_grads()
        with _peft_reading_deprecated_checkpointing_flag():
            return get_peft_model(model, config)

    trainer, _ = build_trainer(run, model_wrapper=wrap)
    summary = _trainable(trainer.model)
    print(f"LoRA on {args.towers}: {summary['trainable_parameters']:,} of {summary['all_parameters']:,} parameters "
          f"trainable ({100 * summary['trainable_share']:.2f}%)", flush=True)
    trainer.train()
    adapter = output_dir / "adapter"
    with dataset_output(adapter) as staging:
        trainer.model.save_pretrained(staging)
    (output_dir / "lora_summary.json").write_text(json.dumps(
        {**summary, "towers": args.towers, "layers": args.layers, "rank": args.rank, "modules_to_save": saved,
         "gradient_checkpointing": checkpointing, "max_steps": training_args["max_steps"]}, indent=2) + "\n")
    print(f"adapter: {adapter}")
    if args.merge:
        print(f"merged model: {merge_adapter(args.model, adapter, output_dir / 'merged')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
