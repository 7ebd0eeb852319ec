"""`regionmed-train`: staged RegionMed-CLIP pretraining on a canonical dataset.

    regionmed-train --preset tiny --data data/synth --output-dir runs/tiny --max-steps 600 --save-steps 200
    regionmed-train --config run.yaml --resume                 # continue from the last complete checkpoint
    torchrun --nproc-per-node 2 -m regionmed_clip.training_scripts.train ...  # DDP (gloo on CPU, nccl on GPU)

Every `transformers.TrainingArguments` field is a flag too (`--gradient-accumulation-steps 4`, `--bf16`,
`--lr-scheduler-type linear`; `--batch-size` is short for `--per-device-train-batch-size`). Training arguments
merge in one order, later winning: the defaults below (`DEFAULT_TRAINING_ARGS`) < the YAML's `training_args`
< the flags given (`arguments.py`). `--debug` is the console scripts' traceback switch, not TrainingArguments'.

The YAML holds five optional sections (command-line flags win over it):

    model:          {preset: base, overrides: {max_rois: 8}, vision_path: ..., text_path: ..., tokenizer: ...}
                    or {pretrained: RUN/final} to continue from a saved RegionMed-CLIP folder
    data:           {path: data/synth, split: train}
    schedule:       joint (the default) | progressive | [list of stages, see training_scripts/schedule.py]
    training_args:  any transformers.TrainingArguments field (per_device_train_batch_size, bf16, ...)
    loss:           training_scripts.losses.ContrastiveLossConfig fields (local_loss, hardest_k,
                    hard_negative_weight, negative_text_margin); the model's config.json holds none

Writes to the output dir: `checkpoint-N/` (complete ones hold a marker), `tokenizer/`,
`train_log.jsonl` (every logged loss term), `loss_curves.png` (stage boundaries marked),
`run_config.yaml` (the resolved configuration) and `final/` (model + processor, Hub remote code).

A run folder may be moved or copied (scratch disk to persistent disk, one machine to another) and
resumed where it now is: where the run and its data live (`LOCATION_KEYS`) is not its configuration.
The data's contents are compared instead (`data_fingerprint.json`).
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainingArguments, set_seed

from regionmed_clip.cli import UsageError, console_script, positive_int
from regionmed_clip.data.fingerprints import dataset_fingerprint
from regionmed_clip.data.schema import load_canonical
from regionmed_clip.figures import plot_loss_curves
from regionmed_clip.modeling_regionmed_clip import CONFIG_ERRORS, PRESETS, RegionMedCLIPConfig, RegionMedCLIPModel
from regionmed_clip.processing import (
    RegionMedCLIPImageProcessor,
    RegionMedCLIPProcessor,
    build_tokenizer,
    load_tokenizer,
)

from .arguments import TrainingCommandParser
from .checkpoints import checkpoint_step, latest_intact_checkpoint
from .collator import RegionMedCLIPCollator, prefetch_lookahead_steps
from .heap import fix_mmap_threshold, limit_onednn_primitive_cache
from .losses import ContrastiveLossConfig
from .schedule import NAMED_SCHEDULES, StagedSchedule, resolve_schedule
from .tower_conversion import model_from_vision_text_pretrained
from .trainer import JsonlLogCallback, RegionMedCLIPTrainer, StageCallback

# `data:` keys of a run config that set the collator's region and window sampling.
COLLATOR_DATA_KEYS = ("region_finding_swaps", "windows_per_image", "window_only_fraction")

__all__ = ["build_trainer", "cpu_threads_advice", "finding_vocabulary", "main", "resolve_run_config"]

logger = logging.getLogger("regionmed_clip.train")

# Defaults chosen for the tiny preset on CPU; the YAML or flags override any of them.
DEFAULT_TRAINING_ARGS: dict[str, Any] = {
    "per_device_train_batch_size": 32,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 3,
    "report_to": "none",
    "remove_unused_columns": False,  # the collator needs every canonical column
    "label_names": [],
    # Collation runs in the training process: on 2 cores, workers took cores from the compute threads
    # (4.9 steps/s without, 4.1 with 1 or 2; docs/PERFORMANCE.md). Where cores are spare, add workers.
    "dataloader_num_workers": 0,
    "ddp_find_unused_parameters": True,  # the ROI processor has no gradient while it is off
    "max_grad_norm": 1.0,
    "dataloader_pin_memory": torch.cuda.is_available(),
    # Without a GPU, torchrun / accelerate launch only form a (gloo) process group when asked for the CPU.
    "use_cpu": not torch.cuda.is_available(),
}
_SECTIONS = {"model", "data", "schedule", "training_args", "loss"}
# Stop a run when more than this share of its rows had to be skipped (`--max-skip-fraction`).
DEFAULT_MAX_SKIP_FRACTION = 0.05


def read_run_yaml(path: Path | None) -> dict[str, Any]:
    """The run YAML at `path` (`--config`) as a mapping of its sections ({} without one); a UsageError
    names the file and what is wrong with it."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise UsageError(f"--config {str(path)!r}: no such file")
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {str(path)!r} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config {str(path)!r}: the run config must be a mapping with sections {sorted(_SECTIONS)}, "
                         f"got a {type(config).__name__}")
    unknown = sorted(set(config) - _SECTIONS, key=str)
    if unknown:
        raise UsageError(f"--config {str(path)!r}: unknown sections {unknown}; allowed: {sorted(_SECTIONS)}")
    for section in ("model", "data", "training_args", "loss"):
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise UsageError(f"--config {str(path)!r}: section {section!r} must be a mapping, "
                             f"got {config[section]!r}")
    return config


def check_training_args(training_args: dict[str, Any], where: str) -> None:
    """UsageError naming the keys of `training_args` that `transformers.TrainingArguments` does not take."""
    known = {field.name for field in dataclasses.fields(TrainingArguments) if field.init}
    unknown = sorted(set(training_args) - known, key=str)
    if unknown:
        raise UsageError(f"{where}: unknown training_args {unknown} (not transformers.TrainingArguments fields)")


def schedule_of(args: Any, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's stages: `--schedule NAME`, else the YAML's `schedule` (a name or a list), else `joint`."""
    try:
        return resolve_schedule(args.schedule or config.get("schedule") or "joint")
    except ValueError as error:
        raise UsageError(f"{'--schedule' if args.schedule else f'--config {str(args.config)!r}'}: {error}") from None


def resolve_run_config(args: "TrainOptions", training_flags: Mapping[str, Any]) -> dict[str, Any]:
    """Merge defaults < YAML < command-line flags into one plain dict (`training_flags`: the TrainingArguments
    fields given on the command line)."""
    config = read_run_yaml(args.config)
    model = {"preset": "tiny", "overrides": {}, **(config.get("model") or {})}
    data = {"split": "train", "max_skip_fraction": DEFAULT_MAX_SKIP_FRACTION, **(config.get("data") or {})}
    check_training_args(config.get("training_args") or {}, f"--config {str(args.config)!r}")
    training_args = {**DEFAULT_TRAINING_ARGS, **(config.get("training_args") or {})}
    training_args.update(training_flags)
    if args.preset:
        model["preset"] = args.preset
    if args.tokenizer:
        model["tokenizer"] = str(args.tokenizer)
    if args.data:
        data["path"] = str(args.data)
    if args.max_skip_fraction is not None:
        data["max_skip_fraction"] = args.max_skip_fraction
    if not 0 <= data["max_skip_fraction"] < 1:
        raise UsageError(f"max_skip_fraction must be in [0, 1), got {data['max_skip_fraction']!r}")
    for key, where in (("output_dir", "--output-dir"), ("max_steps", "--max-steps")):
        if training_args.get(key) in (None, -1):
            raise UsageError(f"{key} is required ({where} or training_args.{key} in the YAML)")
    if not data.get("path"):
        raise UsageError("the dataset is required (--data or data.path in the YAML)")
    if not Path(data["path"]).is_dir():
        raise UsageError(f"--data {str(data['path'])!r}: no such dataset folder")
    if not isinstance(model.get("overrides") or {}, dict):
        raise UsageError(f"--config {str(args.config)!r}: model.overrides must be a mapping of config fields, "
                         f"got {model['overrides']!r}")
    try:  # a bad preset or override is a one-line error now, not a traceback after the data is loaded
        RegionMedCLIPConfig.from_preset(model["preset"], **(model.get("overrides") or {}))
    except CONFIG_ERRORS as error:
        raise UsageError(f"--config {str(args.config)!r}: model: {' '.join(str(error).split())}") from None
    training_args["output_dir"] = str(training_args["output_dir"])
    if Path(training_args["output_dir"]).exists() and not Path(training_args["output_dir"]).is_dir():
        raise UsageError(f"--output-dir {training_args['output_dir']!r} is a file, not a folder")
    return {"model": model, "data": data, "schedule": schedule_of(args, config),
            "loss": dict(config.get("loss") or {}),
            "training_args": training_args}


def _caption_corpus(dataset) -> list[str]:
    """Every caption of the dataset, for the tokenizer; values that are not text are left to the
    collator, which skips and counts them."""
    corpus = []
    for row in dataset.remove_columns("image"):
        regions = row["regions"] if isinstance(row["regions"], list) else []
        candidates = [row["report_caption"], row["summary_caption"], *(row["negative_captions"] or []),
                      *(region.get("caption") for region in regions if isinstance(region, dict))]
        corpus += [text for text in candidates if isinstance(text, str)]
    return corpus


def finding_vocabulary(dataset) -> list[str] | None:
    """The dataset's region labels that region captions name (lower case), for finding swaps in region
    negatives: swapping "nodule" for another finding these films show is harder than for any term.
    None (use `negatives.FINDINGS`) when fewer than two labels are named in captions."""
    named: set[str] = set()
    for regions in dataset.remove_columns("image")["regions"]:
        for region in regions or []:
            label, caption = region.get("label"), region.get("caption")
            if not (isinstance(label, str) and isinstance(caption, str)):
                continue  # the collator skips and counts such regions
            if label and re.search(rf"\b{re.escape(label.lower())}\b", caption.lower()):
                named.add(label.lower())
    return sorted(named) if len(named) >= 2 else None


def build_trainer(
    run: dict[str, Any], resume: bool = False, model_wrapper: Callable[[RegionMedCLIPModel], Any] | None = None
) -> tuple[RegionMedCLIPTrainer, Path | None]:
    """Everything `main` needs: the trainer (model, processor, data, schedule) and the checkpoint to resume.

    `run["model"]` is a preset (a new model), towers to start from (`vision_path` / `text_path`), or a
    saved RegionMed-CLIP folder to continue from (`pretrained`, with its own processor and tokenizer).
    `model_wrapper` wraps the model before training (e.g. `peft.get_peft_model`). Fixes glibc's mmap
    threshold and caps oneDNN's primitive cache for the process (`heap`), so a long run's resident
    memory stays flat."""
    fix_mmap_threshold()
    limit_onednn_primitive_cache()
    training_args = TrainingArguments(**run["training_args"])
    output_dir = Path(training_args.output_dir)
    set_seed(training_args.seed)
    train_dataset = load_canonical(run["data"]["path"], run["data"]["split"], decode_images=False)

    model_spec = run["model"]
    tokenizer_dir = output_dir / "tokenizer"
    # Rank 0 makes (or keeps) the tokenizer folder first; every rank then reads the same files.
    with training_args.main_process_first(desc="tokenizer"):
        if training_args.process_index == 0 and not tokenizer_dir.is_dir():
            # A pretrained text tower needs its own vocabulary: default to the BERT folder's tokenizer.
            source = model_spec.get("tokenizer") or model_spec.get("text_path") or model_spec.get("pretrained")
            if source:
                tokenizer = load_tokenizer(source)
            else:
                vocab_size = RegionMedCLIPConfig.from_preset(model_spec["preset"]).text_config.vocab_size
                tokenizer = build_tokenizer(_caption_corpus(train_dataset), vocab_size=vocab_size)
            tokenizer.save_pretrained(tokenizer_dir)
        tokenizer = load_tokenizer(tokenizer_dir)

    overrides = dict(model_spec.get("overrides") or {})
    if model_spec.get("pretrained"):
        model = RegionMedCLIPModel.from_pretrained(model_spec["pretrained"], **overrides)
    elif model_spec.get("vision_path") or model_spec.get("text_path"):
        model = model_from_vision_text_pretrained(model_spec["vision_path"], model_spec["text_path"], **overrides)
    else:
        config = RegionMedCLIPConfig.from_preset(model_spec["preset"], **overrides)
        if tokenizer.cls_token_id is None:  # e.g. CLIP's BPE: the preset's BERT-style tower pools at [CLS]
            raise UsageError(f"the tokenizer {str(model_spec.get('tokenizer'))!r} has no [CLS] token, which the "
                             f"{model_spec['preset']!r} preset's BERT-style text tower reads; start a CLIP-tokenized "
                             "model from a converted checkpoint (regionmed-convert --from clip, then model.pretrained)")
        # The text tower follows the tokenizer: its special ids, and room for every token.
        config.text_config.pad_token_id = tokenizer.pad_token_id
        config.text_config.cls_token_id = tokenizer.cls_token_id
        config.text_config.vocab_size = max(config.text_config.vocab_size, len(tokenizer))
        config.text_config.validate()
        model = RegionMedCLIPModel(config)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text tower only "
                         f"{model.config.text_config.vocab_size} embeddings")

    config = model.config
    if model_spec.get("pretrained"):  # keep the saved preprocessing: the weights were trained with it
        image_processor = RegionMedCLIPImageProcessor.from_pretrained(model_spec["pretrained"])
    else:
        image_processor = RegionMedCLIPImageProcessor(
            image_size=config.vision_config.image_size, roi_size=config.roi_image_size, max_rois=config.max_rois,
            **_normalisation_of(model_spec.get("vision_path")),
        )
    processor = RegionMedCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # Collator settings a run config may set under `data:` (each the collator's own default otherwise).
    sampling = {key: run["data"][key] for key in COLLATOR_DATA_KEYS if key in run["data"]}
    schedule = StagedSchedule(run["schedule"], training_args.max_steps)
    lookahead = prefetch_lookahead_steps(training_args.dataloader_num_workers, training_args.dataloader_prefetch_factor)
    collator = RegionMedCLIPCollator(processor, seed=training_args.seed, schedule=schedule, lookahead_steps=lookahead,
                                     finding_vocabulary=finding_vocabulary(train_dataset),
                                     background_caption=config.background_caption, **sampling)
    collator.prime(train_dataset)
    loss_fields = run.get("loss") or {}
    unknown = sorted(set(loss_fields) - {field.name for field in dataclasses.fields(ContrastiveLossConfig)})
    if unknown:
        raise ValueError(f"loss: unknown fields {unknown}; known: "
                         f"{[field.name for field in dataclasses.fields(ContrastiveLossConfig)]}")
    trainer = RegionMedCLIPTrainer(
        model=model if model_wrapper is None else model_wrapper(model),
        loss_config=ContrastiveLossConfig(**loss_fields),
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        schedule=schedule,
        callbacks=[StageCallback(schedule, collator), JsonlLogCallback(output_dir / "train_log.jsonl")],
        max_skip_fraction=run["data"].get("max_skip_fraction", DEFAULT_MAX_SKIP_FRACTION),
    )
    checkpoint = None
    if resume:
        checkpoint = latest_intact_checkpoint(output_dir)
        if checkpoint is None:
            logger.warning("--resume: no intact checkpoint in %s, starting from scratch", output_dir)
    return trainer, checkpoint


# Measured by benchmarks/bench_dataloader.py: two concurrent tiny runs at 2 threads each on 2 cores took
# 3.1x the time of the same two at 1 thread each (each 3.9x its time alone; docs/PERFORMANCE.md).
CONTENDED_SLOWDOWN = 3.1
RUN_CONFIG_FILE = "run_config.yaml"
DATA_FINGERPRINT_FILE = "data_fingerprint.json"
# What a fresh run with --overwrite deletes from the folder of an earlier run.
_RUN_OUTPUTS = ("checkpoint-*", "final", "tokenizer", "train_log.jsonl", "loss_curves.png", RUN_CONFIG_FILE,
                DATA_FINGERPRINT_FILE)
# Where a run and its data live, not what the run is: a moved or copied run folder resumes (the data's
# contents are compared through its fingerprint instead of its path); the new locations are saved.
LOCATION_KEYS = ("training_args.output_dir", "training_args.logging_dir", "data.path")
# training_args a resumed run would not honour: the optimizer's and the scheduler's states (learning
# rates, moments) and the data order come back from the checkpoint. Changing one is always an error.
RESTORED_ON_RESUME = ("seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
                      "adam_epsilon", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "optim")


def config_changes(saved: Any, current: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two run configs -> (saved, current)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        changes = {}
        for key in sorted(set(saved) | set(current), key=str):
            changes.update(config_changes(saved.get(key), current.get(key), f"{prefix}{key}."))
        return changes
    return {} if saved == current else {prefix[:-1]: (saved, current)}


def prepare_run_folder(run: dict[str, Any], resume: bool, overwrite: bool = False,
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Refuse what would silently lose or mix runs, before anything is written; returns the data's
    fingerprint (`dataset_fingerprint`, hashed once: the caller saves it with the run).

    A fresh run into a folder that holds a run needs `overwrite` (which deletes that run's outputs).
    `resume` compares the run with the one saved in the folder (its `run_config.yaml` and data
    fingerprint): a value the checkpoint would override (`RESTORED_ON_RESUME`) is an error, any other
    change needs `allow_config_change`. A moved folder is no change (`LOCATION_KEYS`)."""
    output_dir = Path(run["training_args"]["output_dir"])
    saved_path = output_dir / RUN_CONFIG_FILE
    fingerprint = dataset_fingerprint(run["data"]["path"], run["data"]["split"])
    earlier = sorted((path for pattern in _RUN_OUTPUTS for path in output_dir.glob(pattern)), key=lambda path: path.name)
    if not resume:
        if earlier and not overwrite:
            names = [path.name for path in earlier]
            raise UsageError(f"{output_dir} holds a run ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): "
                             "pass --resume to continue it, or --overwrite to delete its outputs and start over")
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return fingerprint
    if not saved_path.exists():
        return fingerprint
    saved = yaml.safe_load(saved_path.read_text())
    changes = config_changes(saved, run)
    moved = {key: changes.pop(key) for key in LOCATION_KEYS if key in changes}
    if moved:
        logger.info("--resume of a moved run: %s", "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in moved.items()))
    fingerprint_path = output_dir / DATA_FINGERPRINT_FILE
    if fingerprint_path.exists():
        before = json.loads(fingerprint_path.read_text())["sha256"]
        if before != fingerprint["sha256"]:
            changes["data (file contents)"] = (before[:12], fingerprint["sha256"][:12])
    described = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    ignored = [key for key in changes if key.removeprefix("training_args.") in RESTORED_ON_RESUME]
    if ignored:
        raise UsageError(f"--resume would ignore {ignored}: the checkpoint restores them ({described}); "
                         f"resume with the saved values, or start a new run")
    if changes and not allow_config_change:
        raise UsageError(f"--resume with a changed run configuration ({described}); pass "
                         "--allow-config-change to continue with the new values, or resume with the saved ones")
    if changes:
        logger.warning("--resume with a changed run configuration: %s", described)
    return fingerprint


def _normalisation_of(vision_path: str | None) -> dict[str, list[float]]:
    """A pretrained vision tower's own pixel mean/std (from its preprocessor_config.json), if it has one."""
    if not vision_path or not (Path(vision_path) / "preprocessor_config.json").exists():
        return {}
    saved = json.loads((Path(vision_path) / "preprocessor_config.json").read_text())
    return {key: saved[key] for key in ("image_mean", "image_std") if key in saved}


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines a killed run wrote after the checkpoint it is resumed from."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def write_loss_plot(log_path: Path, schedule: StagedSchedule, plot_path: Path) -> Path | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        entry = json.loads(line)
        for key, value in entry.items():
            if (key == "loss" or key.startswith("loss_")) and isinstance(value, (int, float)):
                series.setdefault(key, []).append((entry["step"], float(value)))
    if not series:
        return None
    return plot_loss_curves(series, schedule.boundaries(), plot_path, title="RegionMed-CLIP training losses")


def cpu_threads_advice(threads: int, cores: int, load: float) -> str | None:
    """A warning when a CPU run's `threads` would contend with other work (the 1-minute `load`
    average) for the `cores`; None when they fit."""
    free = max(1, cores - round(load))
    if threads <= free:
        return None
    return (f"the CPU is busy (1-minute load {load:.1f} on {cores} cores) and this run uses {threads} threads: "
            f"threads that share cores wait on each other (two runs at 2 threads on 2 cores ran "
            f"{CONTENDED_SLOWDOWN}x slower than at 1 each); pass --threads {free}, or stop the other work")


@dataclasses.dataclass
class TrainOptions:
    """`regionmed-train`'s own options; every `TrainingArguments` field is a flag besides (`arguments.py`)."""

    preset: str | None = dataclasses.field(default=None, metadata={"choices": sorted(PRESETS),
                                                                   "help": "model size (default: the YAML's, else tiny)"})
    data: Path | None = dataclasses.field(default=None, metadata={"help": "canonical dataset folder (parquet shards)"})
    schedule: str | None = dataclasses.field(default=None, metadata={
        "choices": sorted(NAMED_SCHEDULES),
        "help": "a named schedule (default: the YAML's `schedule`, else joint); progressive = the paper's four stages"})
    tokenizer: Path | None = dataclasses.field(default=None, metadata={"help": "a local BERT-style tokenizer folder"})
    max_skip_fraction: float | None = dataclasses.field(default=None, metadata={
        "help": f"stop when more than this share of the rows is skipped (default {DEFAULT_MAX_SKIP_FRACTION})"})
    threads: int | None = dataclasses.field(default=None, metadata={
        "help": "CPU threads for the training process (default: torch's, one per core). With other jobs on the "
                f"machine give each cores / jobs: two runs at 2 threads on 2 cores ran {CONTENDED_SLOWDOWN}x slower "
                "than at 1 each (docs/PERFORMANCE.md). DataLoader workers use 1 thread each"})
    config: Path | None = dataclasses.field(default=None, metadata={
        "help": "run YAML (model, data, schedule, training_args, loss)"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest intact checkpoint"})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "start over in a folder that holds a run (its checkpoints and outputs are deleted)"})
    allow_config_change: bool = dataclasses.field(default=False, metadata={
        "help": "--resume even though the data or run configuration changed since the run started"})


def parse_command(argv: list[str] | None = None) -> tuple[TrainOptions, dict[str, Any]]:
    """`regionmed-train`'s command line -> `(options, the TrainingArguments flags given)`."""
    parser = TrainingCommandParser("regionmed-train", __doc__, TrainOptions, types={"threads": positive_int},
                                   shorthands={"--batch-size": "per_device_train_batch_size"})
    return parser.parse(argv)


@console_script("regionmed-train")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, training_flags = parse_command(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available() and hasattr(os, "getloadavg") and (
            advice := cpu_threads_advice(torch.get_num_threads(), os.cpu_count() or 1, os.getloadavg()[0])):
        logger.warning(advice)
    run = resolve_run_config(args, training_flags)
    fingerprint = None
    if int(os.environ.get("RANK", "0")) == 0:  # before any rank writes into the folder
        fingerprint = prepare_run_folder(run, args.resume, args.overwrite, args.allow_config_change)
    trainer, checkpoint = build_trainer(run, resume=args.resume)
    output_dir = Path(trainer.args.output_dir)
    log_path = output_dir / "train_log.jsonl"
    final_dir = output_dir / "final"
    finished = checkpoint is not None and checkpoint_step(checkpoint) >= trainer.args.max_steps
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run, sort_keys=False))
        (output_dir / DATA_FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1))
        if checkpoint is not None:
            _truncate_log(log_path, checkpoint_step(checkpoint))
        elif log_path.exists():
            log_path.unlink()  # a fresh run starts a fresh log
    if finished:
        # Training on would take a step past the end (with the learning rate rising again) and rotate
        # away the true last checkpoint: only write the final model if it is missing.
        print(f"regionmed-train: {checkpoint.name} is at or past max_steps={trainer.args.max_steps}: nothing to train")
        if (final_dir / "model.safetensors").exists():
            return 0
        trainer._load_from_checkpoint(str(checkpoint))
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)  # TooManySkipsError: exit 3
        skips = trainer.run_skips()
        if trainer.is_world_process_zero():
            print(f"data: {skips.summary()}")
        skips.check(trainer.max_skip_fraction)

    trainer.save_model(final_dir)  # on every rank: FSDP gathers the full weights collectively
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(final_dir)
        plot = write_loss_plot(log_path, trainer.schedule, output_dir / "loss_curves.png")
        print(f"model (remote code, with processor): {final_dir}")
        print(f"loss log: {log_path}")
        print(f"loss curves: {plot}" if plot else f"loss curves: not drawn, no step logged its losses (logging every "
              f"{trainer.args.logging_steps} steps, {trainer.args.max_steps} steps run: lower --logging-steps)")
    trainer.accelerator.wait_for_everyone()
    _shut_down_process_group()
    return 0


def _shut_down_process_group() -> None:
    """Destroy the process group before the interpreter exits, after a run that succeeded.

    A rank that exits with its gloo group alive can abort in C++ ("terminate called without an
    active exception") while the group's threads are still joinable, failing a finished run. Not
    after an error: NCCL's teardown waits for collectives the other ranks may never join, so a
    failing rank exits at once and the launcher stops the job.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
