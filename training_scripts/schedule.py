"""The training schedule, as data: one joint stage by default, the paper's progressive stages on request.

A schedule is a name from `NAMED_SCHEDULES` (`joint`, the default; `progressive`, the paper's four
stages) or a list of stages (plain dicts, e.g. from YAML):

    {"name": "roi", "fraction": 0.4,                    # or "steps": 300
     "loss_weights": {"global_report": 1.0, "region": 0.5},
     "lr_multipliers": {"vision": 0.1, "text": 0.1},   # groups not named train at 1.0; 0.0 freezes
     "use_rois": true}                                   # feed ROI crops (the ROI processor is on)

Parameter groups: `vision` (vision tower), `text` (text tower), `roi` (ROI processor),
`projections` (visual + text projections), `temperature` (logit scale).

The stage is a pure function of the global step (`stage_at`), so a resumed run lands in the
right stage by itself. Stage lengths resolve against `max_steps`: fractions are rounded to
whole steps; if the stages cover fewer steps than `max_steps` the last stage runs to the end,
and stages that start at or after `max_steps` never run (both are logged).
"""

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .losses import DEFAULT_LOSS_WEIGHTS, LOSS_TERMS, TERM_CAPTION_LEVELS

__all__ = ["DEFAULT_STAGES", "NAMED_SCHEDULES", "PARAMETER_GROUPS", "PROGRESSIVE_STAGES", "Stage", "StagedSchedule",
           "parameter_group_of", "resolve_schedule"]

logger = logging.getLogger(__name__)

PARAMETER_GROUPS = ("vision", "text", "roi", "projections", "temperature")

# Default: every term from the first step, regions on. Measured (docs/TRAINING.md): the global-only
# objective of the paper's warm-up stages learns nothing in 600 steps from scratch (report loss
# 3.47 -> 3.42, chance zero-shot AUROC), and the four-stage schedule spent its peak learning rate
# there, ran the towers at x0.1 through the ROI stage and left the joint stage the decayed tail
# (side accuracy 0.60 against 0.998 for the same steps in one joint stage). The region terms are
# what teach the global tower, so they run from the start.
DEFAULT_STAGES: list[dict[str, Any]] = [
    {"name": "joint", "fraction": 1.0, "loss_weights": dict(DEFAULT_LOSS_WEIGHTS), "lr_multipliers": {}, "use_rois": True},
]

# The paper's outline, kept for users who start from pretrained towers (where a global warm-up has
# something to align): global warm-up -> refinement -> ROI processor on with region and negative
# captions (towers x0.1) -> joint. Select it with `schedule: progressive` in the run YAML or `--schedule progressive`.
PROGRESSIVE_STAGES: list[dict[str, Any]] = [
    {"name": "warmup", "fraction": 0.1, "loss_weights": {"global_report": 1.0},
     "lr_multipliers": {"roi": 0.0}, "use_rois": False},
    {"name": "refine", "fraction": 0.1, "loss_weights": {"global_report": 1.0, "global_summary": 0.5},
     "lr_multipliers": {"roi": 0.0}, "use_rois": False},
    {"name": "roi", "fraction": 0.4, "loss_weights": dict(DEFAULT_LOSS_WEIGHTS),
     "lr_multipliers": {"vision": 0.1, "text": 0.1}, "use_rois": True},
    {"name": "joint", "fraction": 0.4, "loss_weights": dict(DEFAULT_LOSS_WEIGHTS), "lr_multipliers": {}, "use_rois": True},
]

# Schedules by name: `schedule: progressive` in the run YAML, or `--schedule progressive`.
NAMED_SCHEDULES: dict[str, list[dict[str, Any]]] = {"joint": DEFAULT_STAGES, "progressive": PROGRESSIVE_STAGES}


def resolve_schedule(schedule: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The stages of `schedule`: a name from `NAMED_SCHEDULES` or a list of stage mappings (copied).

    Raises ValueError naming an unknown schedule, or the stage that is not a mapping."""
    if isinstance(schedule, str):
        if schedule not in NAMED_SCHEDULES:
            raise ValueError(f"schedule: unknown schedule {schedule!r}; named schedules: {sorted(NAMED_SCHEDULES)}, "
                             "or a list of stages")
        schedule = NAMED_SCHEDULES[schedule]
    if isinstance(schedule, Mapping) or not isinstance(schedule, Sequence):
        raise ValueError(f"schedule: must be a schedule name {sorted(NAMED_SCHEDULES)} or a list of stages, "
                         f"got {type(schedule).__name__}")
    for index, spec in enumerate(schedule):
        if not isinstance(spec, Mapping):
            raise ValueError(f"schedule[{index}]: a stage must be a mapping (name, fraction or steps, loss_weights, "
                             f"lr_multipliers, use_rois), got {spec!r}")
    return [dict(spec) for spec in schedule]


# Prefixes that wrappers put in front of parameter names (FSDP, activation checkpointing, DDP,
# torch.compile, PEFT); the schedule groups are defined on the bare model's names.
_WRAPPER_PREFIXES = re.compile(
    r"(_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.|_orig_mod\.|^module\.|^base_model\.model\.)")


def bare_parameter_name(parameter_name: str) -> str:
    """The name on the bare `RegionMedCLIPModel`, without the prefixes of DDP, FSDP, checkpointing, compile, PEFT."""
    return _WRAPPER_PREFIXES.sub("", parameter_name)


def parameter_group_of(parameter_name: str) -> str:
    """Which schedule group a `RegionMedCLIPModel` parameter belongs to (wrapper prefixes ignored)."""
    parameter_name = bare_parameter_name(parameter_name)
    for prefix, group in (
        ("vision_model.", "vision"),
        ("text_model.", "text"),
        ("roi_processor.", "roi"),
        ("visual_projection.", "projections"),
        ("text_projection.", "projections"),
        ("logit_scale", "temperature"),
    ):
        if parameter_name.startswith(prefix):
            return group
    raise ValueError(f"parameter {parameter_name!r} belongs to no schedule group {PARAMETER_GROUPS}")


@dataclass(frozen=True)
class Stage:
    name: str
    start: int  # first global step of the stage
    end: int  # one past the last
    loss_weights: Mapping[str, float]
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)
    use_rois: bool = False

    def lr_multiplier(self, group: str) -> float:
        return self.lr_multipliers.get(group, 1.0)

    def frozen_groups(self) -> set[str]:
        return {group for group in PARAMETER_GROUPS if self.lr_multiplier(group) == 0.0}

    def uses(self, term: str) -> bool:
        return self.loss_weights.get(term, 0.0) > 0

    def caption_levels(self) -> frozenset[str]:
        """The caption levels (`processing.CAPTION_LEVELS` names) its loss terms read; the report always."""
        return frozenset({"report"} | {level for term in LOSS_TERMS if self.uses(term) for level in TERM_CAPTION_LEVELS[term]})

    def uses_regions(self) -> bool:
        """Whether its batches need the sampled regions: their ROI crops or their captions."""
        return self.use_rois or "region" in self.caption_levels()


def _check_stage(spec: Mapping[str, Any], index: int) -> None:
    where = f"schedule[{index}] ({spec.get('name', '?')!r})"
    allowed = {"name", "steps", "fraction", "loss_weights", "lr_multipliers", "use_rois"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(f"{where}: needs a non-empty 'name'")
    if ("steps" in spec) == ("fraction" in spec):
        raise ValueError(f"{where}: give exactly one of 'steps' or 'fraction'")
    if "steps" in spec and (not isinstance(spec["steps"], int) or spec["steps"] <= 0):
        raise ValueError(f"{where}: 'steps' must be a positive integer, got {spec['steps']!r}")
    if "fraction" in spec and not (isinstance(spec["fraction"], (int, float)) and 0 < spec["fraction"] <= 1):
        raise ValueError(f"{where}: 'fraction' must be in (0, 1], got {spec['fraction']!r}")
    for key in ("loss_weights", "lr_multipliers"):
        value = spec.get(key) or {}
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: '{key}' must be a mapping of names to numbers, got {value!r}")
        for name, number in value.items():
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError(f"{where}: '{key}.{name}' must be a number, got {number!r}")
    if not isinstance(spec.get("use_rois", False), bool):
        raise ValueError(f"{where}: 'use_rois' must be true or false, got {spec['use_rois']!r}")
    weights = spec.get("loss_weights") or {}
    unknown_terms = sorted(set(weights) - set(LOSS_TERMS))
    if unknown_terms:
        raise ValueError(f"{where}: unknown loss terms {unknown_terms}; known: {list(LOSS_TERMS)}")
    if not any(float(w) > 0 for w in weights.values()):
        raise ValueError(f"{where}: needs at least one loss term with a positive weight")
    if any(not math.isfinite(float(w)) or float(w) < 0 for w in weights.values()):
        raise ValueError(f"{where}: loss weights must be finite and >= 0, got {dict(weights)}")
    multipliers = spec.get("lr_multipliers") or {}
    unknown_groups = sorted(set(multipliers) - set(PARAMETER_GROUPS))
    if unknown_groups:
        raise ValueError(f"{where}: unknown parameter groups {unknown_groups}; known: {list(PARAMETER_GROUPS)}")
    if any(not math.isfinite(float(m)) or float(m) < 0 for m in multipliers.values()):
        raise ValueError(f"{where}: lr multipliers must be finite and >= 0, got {dict(multipliers)}")
    if weights.get("region", 0) > 0 and not spec.get("use_rois", False):
        raise ValueError(f"{where}: the 'region' loss needs 'use_rois: true'")


class StagedSchedule:
    """Stages resolved to step ranges for a run of `max_steps` optimizer steps."""

    def __init__(self, stages: str | Sequence[Mapping[str, Any]], max_steps: int):
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        stages = resolve_schedule(stages)
        if not stages:
            raise ValueError("the schedule needs at least one stage")
        for index, spec in enumerate(stages):
            _check_stage(spec, index)
        names = [spec["name"] for spec in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"schedule: stage names must be unique, got {names}")
        resolved, start = [], 0
        for spec in stages:
            length = spec["steps"] if "steps" in spec else max(1, round(spec["fraction"] * max_steps))
            if start >= max_steps:
                logger.warning("stage %r starts at step %d >= max_steps %d and will not run", spec["name"], start,
                               max_steps)
            resolved.append(
                Stage(
                    name=spec["name"],
                    start=start,
                    end=start + length,
                    loss_weights={k: float(v) for k, v in spec["loss_weights"].items()},
                    lr_multipliers={k: float(v) for k, v in (spec.get("lr_multipliers") or {}).items()},
                    use_rois=bool(spec.get("use_rois", False)),
                )
            )
            start += length
        if start < max_steps:
            logger.info("stages cover %d of %d steps; %r runs to the end", start, max_steps, resolved[-1].name)
            last = resolved[-1]
            resolved[-1] = Stage(last.name, last.start, max_steps, last.loss_weights, last.lr_multipliers, last.use_rois)
        self.stages = resolved
        self.max_steps = max_steps

    def stage_at(self, step: int) -> Stage:
        """The stage that global step `step` (0-based, optimizer steps) belongs to."""
        for stage in self.stages:
            if step < stage.end:
                return stage
        return self.stages[-1]

    def stages_between(self, first_step: int, last_step: int) -> list[Stage]:
        """The stages that steps `first_step..last_step` (inclusive) belong to, in order."""
        first, last = self.stage_at(first_step), self.stage_at(last_step)
        return self.stages[self.stages.index(first):self.stages.index(last) + 1]

    def lr_multiplier(self, group: str, step: int) -> float:
        return self.stage_at(step).lr_multiplier(group)

    def boundaries(self) -> list[tuple[str, int]]:
        """`(name, start step)` of each stage that runs."""
        return [(stage.name, stage.start) for stage in self.stages if stage.start < self.max_steps]
