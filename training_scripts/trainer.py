"""`RegionMedCLIPTrainer`: a `transformers.Trainer` that runs the staged schedule.

- One optimizer parameter group per schedule group (x weight decay / none; as in open_clip, no
  decay for biases, norms and every parameter with fewer than 2 dims: the temperature and the ROI
  gates would otherwise be pulled toward 1 and "ROIs off"); a `LambdaLR` gives each group
  `base_schedule(step) x stage_multiplier(group, step)`: a pure function of the global step, so a
  resumed run has the right learning rates without extra state. When an fp16 GradScaler skips a
  step, transformers does not step the scheduler; it is set back onto the global step before the
  next one, so stage multipliers never trail a boundary.
- After every optimizer step the log-temperature is clamped in place to log(100), as open_clip
  does: clamping only its exp in the loss would leave a parameter past the bound with no gradient.
- Freezing never toggles `requires_grad` (unsafe once DDP has wrapped the model): a group whose
  multiplier is 0 has lr 0 AND its gradients are dropped after backward (after DDP's all-reduce),
  so the optimizer skips it: its weights do not move and its Adam moments do not change.
- The loss terms of the current stage are computed from the model's outputs by `losses.training_loss`
  (the stage's weights); each term and the stage are logged, with the mean pairwise cosine of the box-free
  image embeddings and of the report embeddings (a collapse alarm that pooled ground-truth regions cannot
  hide). They are summed on the device and read on logging steps only.
- A non-finite loss skips the optimizer step (all gradients dropped, on every rank; with gradient
  accumulation, the whole window) and is counted; `max_consecutive_nonfinite` skipped steps in a
  row save a checkpoint and stop with a clear error.
- Checkpoints are made atomic by a completion marker written last, recording every file's size and
  SHA-256 (`checkpoints.py`); rotation of old checkpoints happens only after it, so a kill while
  saving leaves the previous checkpoint usable, and `latest_intact_checkpoint` resumes from the
  newest checkpoint whose files still match.
- Nothing pickled in a model folder: the training arguments are saved as `training_args.json`,
  not transformers' `training_args.bin` (a pickle), in checkpoints and in `final/` alike.
"""

import json
import logging
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, get_scheduler
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from regionmed_clip.data.skips import SkipLedger
from regionmed_clip.modeling_regionmed_clip.modeling_regionmed_clip import LOGIT_SCALE_MAX
from regionmed_clip.processing import CAPTION_LEVELS, ROI_INPUT_NAMES
from regionmed_clip.scoring import mean_pairwise_cosine

from .checkpoints import CHECKPOINT_COMPLETE, write_completion_marker
from .heap import HEAP_TRIM_STEPS, release_free_heap
from .losses import ContrastiveLossConfig, training_loss
from .schedule import PARAMETER_GROUPS, Stage, StagedSchedule, bare_parameter_name, parameter_group_of

__all__ = [
    "SKIPS_FILE",
    "TRAINING_ARGS_FILE",
    "JsonlLogCallback",
    "NonFiniteLossError",
    "RegionMedCLIPTrainer",
    "StageCallback",
    "mean_over_ranks",
    "stage_input_names",
]

logger = logging.getLogger(__name__)

# The skip ledger of the run, in every checkpoint: a resumed run continues its counts.
SKIPS_FILE = "skips.json"
# A mid-run stop for too many skipped rows waits for this many rows: a few bad rows early mean little.
_MIN_ROWS_FOR_SKIP_CHECK = 200
# The training arguments as JSON, in place of transformers' pickled `training_args.bin`.
TRAINING_ARGS_FILE = "training_args.json"


def stage_input_names(stage: Stage) -> list[str]:
    """The batch keys a stage's forward needs: the images (and ROIs when the stage uses them) and the
    caption levels its loss terms read (`Stage.caption_levels`, in `processing.CAPTION_LEVELS` order)."""
    names = ["pixel_values", *(ROI_INPUT_NAMES if stage.use_rois else ())]
    levels = stage.caption_levels()
    return names + [name for level in CAPTION_LEVELS if level.name in levels for name in level.input_names]


class NonFiniteLossError(RuntimeError):
    pass


def mean_over_ranks(parameter: torch.Tensor) -> torch.Tensor:
    """Mean of `parameter`'s elements as every rank holds them (0-d), read on every rank.

    Under FSDP a rank may hold none of a small parameter (its shard view is empty), under DDP every
    rank holds all of it: summing elements and counts over ranks gives the mean in both cases.
    """
    totals = torch.stack([parameter.detach().float().sum(), torch.tensor(float(parameter.numel()),
                                                                          device=parameter.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals[0] / totals[1]


class RegionMedCLIPTrainer(Trainer):
    """Trainer for `RegionMedCLIPModel` with a `StagedSchedule` (see the module docstring)."""

    # The contrastive loss is a per-batch mean, not normalised by `num_items_in_batch`.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, schedule: StagedSchedule, max_consecutive_nonfinite: int = 5,
                 loss_config: ContrastiveLossConfig | None = None, max_skip_fraction: float = 0.05, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config or ContrastiveLossConfig()
        # Read once: a DDP / FSDP / PEFT wrapper hides the config behind its own attributes.
        self.pad_token_id = self.model.config.text_config.pad_token_id
        if self.is_deepspeed_enabled:
            logger.warning(
                "DeepSpeed steps its optimizer inside backward and keeps gradients in its own buffers: frozen "
                "groups are held by lr 0 only (their Adam moments still update) and non-finite steps are left to "
                "DeepSpeed's loss scaler"
            )
        self.schedule = schedule
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.nonfinite_steps = 0
        # This rank's skipped rows and regions (a resumed run restores the run's total on rank 0); the
        # collator reports them per batch, since in DataLoader workers its own ledger is a copy.
        self.skips = SkipLedger()
        self.max_skip_fraction = max_skip_fraction
        self._consecutive_nonfinite = 0
        self._window_nonfinite = False
        self._last_saved_step: int | None = None  # by this run: a folder on disk may be an earlier run's
        # Per-term sums and counts of finite values since the last log, kept on the device: read on
        # logging steps only, so a training step never waits on the device for a logged number.
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, torch.Tensor] = {}
        self._group_parameters: dict[str, list[nn.Parameter]] = defaultdict(list)
        # Read shapes now: the optimizer may be built after FSDP has flattened every parameter to 1-d.
        self._low_dim_parameters: set[str] = set()
        # The log-temperature, trained or not (under LoRA it is frozen, and still logged).
        self._logit_scale: nn.Parameter | None = None
        for name, parameter in self.model.named_parameters():
            if parameter.ndim < 2:
                self._low_dim_parameters.add(bare_parameter_name(name))
            if bare_parameter_name(name) == "logit_scale":
                self._logit_scale = parameter
            if parameter.requires_grad:
                self._group_parameters[parameter_group_of(name)].append(parameter)
        self.add_callback(_ClampTemperatureCallback(self._group_parameters["temperature"]))
        self.add_callback(ReleaseFreedHeapCallback())

    # -- optimisation --------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        decay = {name for name in self.get_decay_parameter_names(model)
                 if bare_parameter_name(name) not in self._low_dim_parameters}
        groups = []
        for group in PARAMETER_GROUPS:
            for with_decay in (True, False):
                params = [p for n, p in model.named_parameters()
                          if p.requires_grad and parameter_group_of(n) == group and (n in decay) == with_decay]
                if params:
                    groups.append({"params": params, "name": group,
                                   "weight_decay": self.args.weight_decay if with_decay else 0.0})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = optimizer or self.optimizer
        # Reuse transformers' schedule shapes: build one on a throwaway optimizer and keep its lambda.
        probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        base = get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=probe,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        if not isinstance(base, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(f"lr_scheduler_type {self.args.lr_scheduler_type!r} is not a step-lambda schedule; "
                             "use linear, cosine, constant or constant_with_warmup with the staged trainer")
        base_lambda = base.lr_lambdas[0]

        def group_lambda(group: str):
            return lambda step: base_lambda(step) * self.schedule.lr_multiplier(group, step)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [group_lambda(group["name"]) for group in optimizer.param_groups]
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # -- loss ---------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        stage = self.schedule.stage_at(self.state.global_step)
        keys = stage_input_names(stage)
        missing = [key for key in keys if key not in inputs]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs batch inputs {missing}; check the collator's switches")
        if "skip_report" in inputs:
            self.skips.merge(inputs["skip_report"])
        batch = {key: inputs[key] for key in keys}
        outputs = model(**batch)
        loss, terms = training_loss(outputs, batch, outputs.logit_scale, self.pad_token_id, dict(stage.loss_weights),
                                    self.loss_config)
        for term, value in terms.items():
            self._record(f"loss_{term}", value.detach())
        # The collapse monitor reads the box-free image embedding (what a user without boxes gets)
        # and the report embeddings: pooled ground-truth regions would hide a collapsed global view.
        self._record("box_free_image_mean_cosine", mean_pairwise_cosine(outputs.box_free_image_embeds.detach()))
        self._record("text_mean_cosine", mean_pairwise_cosine(outputs.text_embeds.detach()))
        return (loss, outputs) if return_outputs else loss

    def _record(self, name: str, value: torch.Tensor) -> None:
        """Add a 0-dim `value` to its running sum when finite, without reading it on the host."""
        finite = torch.isfinite(value)
        value = torch.where(finite, value.double(), 0.0)
        if name in self._term_sums:
            self._term_sums[name] += value
            self._term_counts[name] += finite
        else:
            self._term_sums[name], self._term_counts[name] = value, finite.long()

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        self._sync_lr_schedule()
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss).to(torch.float32)
        if dist.is_available() and dist.is_initialized():  # every rank must skip together
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self._window_nonfinite |= finite.item() < 1
        if not self.accelerator.sync_gradients:
            return loss  # gradients still accumulate: decide at the window's last micro-batch
        if self._window_nonfinite:
            self._window_nonfinite = False
            self._skip_nonfinite_step()
            return loss
        self._consecutive_nonfinite = 0
        for group in self.schedule.stage_at(self.state.global_step).frozen_groups():
            for parameter in self._group_parameters[group]:
                parameter.grad = None
        return loss

    def _sync_lr_schedule(self) -> None:
        """Put the LambdaLR back on the global step if it fell behind (steps skipped by fp16's scaler)."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate may wrap it
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or scheduler.last_epoch == self.state.global_step:
            return
        scheduler.last_epoch = self.state.global_step - 1
        with warnings.catch_warnings():  # "step() before optimizer.step()": expected when every step was skipped
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()

    def _skip_nonfinite_step(self) -> None:
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        # With a GradScaler (fp16) the non-finite gradients make the scaler skip the step itself
        # (and it needs them to record that); otherwise drop them: the optimizer skips
        # parameters without a gradient, so nothing moves.
        if self.accelerator.scaler is None:
            for parameter in self.model.parameters():
                parameter.grad = None
        logger.warning("non-finite loss at step %d: step skipped (%d so far, %d in a row)",
                       self.state.global_step, self.nonfinite_steps, self._consecutive_nonfinite)
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            if self._last_saved_step != self.state.global_step:  # else the skipped steps changed nothing since
                self._save_checkpoint(self.model, trial=None)
            raise NonFiniteLossError(
                f"{self._consecutive_nonfinite} consecutive non-finite losses at step {self.state.global_step}; "
                f"stopped. The last good weights are saved in "
                f"{os.path.join(self.args.output_dir, f'{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}')}. "
                "Lower the learning rate, check the data, or use fp32."
            )

    # -- logging and checkpoints ----------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the averaged terms since the previous one
            names = list(self._term_sums)
            if names:  # one read of every term
                sums = torch.stack([self._term_sums[name] for name in names]).tolist()
                counts = torch.stack([self._term_counts[name] for name in names]).tolist()
                for name, total, count in zip(names, sums, counts, strict=True):
                    if count:
                        logs[name] = round(total / count, 6)
            self._term_sums.clear()
            self._term_counts.clear()
            stage = self.schedule.stage_at(max(self.state.global_step - 1, 0))
            logs["stage"] = stage.name
            logs["nonfinite_steps"] = self.nonfinite_steps
            if self._logit_scale is not None:
                logs["logit_scale"] = round(mean_over_ranks(self._logit_scale).exp().item(), 4)
        if "loss" in logs or "train_runtime" in logs:  # every training log, and the run's summary log
            skips = self.run_skips()
            logs.update(rows_seen=skips.rows_seen, skipped_rows=skips.rows_skipped,
                        skipped_regions=skips.regions_skipped, skip_reasons=dict(skips.reasons))
        super().log(logs, start_time)
        if "loss" in logs:
            # Mid-run, only once enough rows were seen for the share to mean something; the end is checked by the caller.
            skips.check(self.max_skip_fraction, min_rows=_MIN_ROWS_FOR_SKIP_CHECK)

    def run_skips(self) -> SkipLedger:
        """The skips of every rank, since the run started (collective: call on every rank)."""
        if not (dist.is_available() and dist.is_initialized()):
            return SkipLedger.from_dict(self.skips.to_dict())
        reports: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(reports, self.skips.to_dict())
        total = SkipLedger()
        for report in reports:
            total.merge(report)
        return total

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = Path(resume_from_checkpoint) / SKIPS_FILE
        if self.args.process_index == 0 and saved.exists():  # the run's total, carried by rank 0 from here on
            self.skips = SkipLedger.from_dict(json.loads(saved.read_text()))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """transformers' save, with the training arguments as JSON instead of a pickle."""
        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # transformers calls it on every rank; only the writer writes
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        (folder / TRAINING_ARGS_FILE).write_text(self.args.to_json_string())

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            # Rewriting a folder (a re-run over a step) must not keep claiming the old files are complete.
            (folder / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate old checkpoints only once the new one is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (e.g. its RNG state) are written
        skips = self.run_skips()
        if not self.args.should_save:
            return
        (folder / SKIPS_FILE).write_text(json.dumps(skips.to_dict(), indent=1))
        run_dir = self._get_output_dir(trial=trial)
        write_completion_marker(folder, self.state.global_step)
        self._last_saved_step = self.state.global_step
        if limit:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


class _ClampTemperatureCallback(TrainerCallback):
    """Clamps the log-temperature parameter(s) to log(LOGIT_SCALE_MAX) after every optimizer step."""

    def __init__(self, parameters: list[nn.Parameter]):
        self.parameters = parameters
        self.bound = math.log(LOGIT_SCALE_MAX)

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for parameter in self.parameters:
                parameter.clamp_(max=self.bound)


class ReleaseFreedHeapCallback(TrainerCallback):
    """`heap.release_free_heap` every `every_steps` optimizer steps."""

    def __init__(self, every_steps: int = HEAP_TRIM_STEPS):
        self.every_steps = every_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps == 0:
            release_free_heap()


class StageCallback(TrainerCallback):
    """Announces stage changes and keeps the collator in step: its region sampling with the epoch, what
    it builds with the global step (set before the DataLoader starts, so a resumed run's first
    batches are built for its stage)."""

    def __init__(self, schedule: StagedSchedule, collator: Any = None):
        self.schedule = schedule
        self.collator = collator
        self._current: str | None = None

    def _set_collator_step(self, step: int) -> None:
        if self.collator is not None and hasattr(self.collator, "set_step"):
            self.collator.set_step(step)

    def on_train_begin(self, args, state, control, **kwargs):
        self._set_collator_step(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set_collator_step(state.global_step)
        stage = self.schedule.stage_at(state.global_step)
        if stage.name != self._current:
            if state.is_world_process_zero:
                frozen = sorted(stage.frozen_groups()) or "none"
                weights = ", ".join(f"{k}={v}" for k, v in stage.loss_weights.items() if v > 0)
                logger.warning("stage %r from step %d (until %d): losses %s; frozen groups: %s; ROIs %s",
                               stage.name, state.global_step, stage.end, weights, frozen,
                               "on" if stage.use_rois else "off")
            self._current = stage.name

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._set_collator_step(state.global_step)
        if self.collator is not None and hasattr(self.collator, "set_epoch"):
            self.collator.set_epoch(int(state.epoch or 0))


class JsonlLogCallback(TrainerCallback):
    """Appends every training log (each loss term, the stage, lr, ...) to a JSON-lines file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as stream:
                stream.write(json.dumps({"step": state.global_step, **logs}) + "\n")
