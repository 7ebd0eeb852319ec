import pytest

from regionmed_clip.training_scripts.schedule import (
    DEFAULT_STAGES,
    PARAMETER_GROUPS,
    PROGRESSIVE_STAGES,
    StagedSchedule,
    parameter_group_of,
    resolve_schedule,
)

from conftest import tiny_model


def test_default_schedule_follows_the_paper_outline():
    schedule = StagedSchedule(PROGRESSIVE_STAGES, max_steps=100)
    assert schedule.boundaries() == [("warmup", 0), ("refine", 10), ("roi", 20), ("joint", 60)]
    warmup, refine, roi, joint = (schedule.stage_at(step) for step in (0, 10, 20, 99))
    assert set(warmup.loss_weights) == {"global_report"} and not warmup.use_rois
    assert warmup.frozen_groups() == {"roi"}
    assert refine.uses("global_summary") and not refine.uses("region")
    assert roi.use_rois and roi.uses("region") and roi.uses("hard_negative")
    assert roi.lr_multiplier("vision") == 0.1 and roi.lr_multiplier("roi") == 1.0
    assert joint.frozen_groups() == set()


def test_stage_is_a_pure_function_of_the_step():
    schedule = StagedSchedule([{"name": "a", "steps": 3, "loss_weights": {"global_report": 1}},
                               {"name": "b", "steps": 2, "loss_weights": {"global_report": 1}}], max_steps=8)
    assert [schedule.stage_at(step).name for step in range(8)] == ["a"] * 3 + ["b"] * 5  # last runs to the end
    assert schedule.stage_at(1000).name == "b"


def test_stages_past_max_steps_do_not_run():
    schedule = StagedSchedule([{"name": "a", "steps": 5, "loss_weights": {"global_report": 1}},
                               {"name": "b", "steps": 5, "loss_weights": {"global_report": 1}}], max_steps=4)
    assert schedule.boundaries() == [("a", 0)]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"name": "a", "steps": 1, "fraction": 0.5, "loss_weights": {"global_report": 1}}, "exactly one of"),
        ({"name": "a", "loss_weights": {"global_report": 1}}, "exactly one of"),
        ({"name": "a", "steps": 0, "loss_weights": {"global_report": 1}}, "'steps' must be a positive"),
        ({"name": "a", "fraction": 1.5, "loss_weights": {"global_report": 1}}, "'fraction' must be in"),
        ({"name": "a", "steps": 1, "loss_weights": {"global": 1}}, "unknown loss terms"),
        ({"name": "a", "steps": 1, "loss_weights": {"global_report": 0}}, "at least one loss term"),
        ({"name": "a", "steps": 1, "loss_weights": {"region": 1}}, "needs 'use_rois: true'"),
        ({"name": "a", "steps": 1, "loss_weights": {"global_report": 1}, "lr_multipliers": {"bert": 0}}, "unknown parameter groups"),
        ({"name": "a", "steps": 1, "loss_weights": {"global_report": 1}, "lr_multipliers": {"text": -1}}, ">= 0"),
        ({"name": "a", "steps": 1, "loss_weights": {"global_report": 1}, "frozen": ["text"]}, r"unknown keys \['frozen'\]"),
        ({"name": "a", "steps": 1, "loss_weights": ["global_report"]}, r"schedule\[0\] \('a'\): 'loss_weights' must be a mapping"),
        ({"name": "a", "steps": 1, "loss_weights": {"global_report": "high"}}, r"'loss_weights.global_report' must be a number"),
        ({"name": "a", "steps": 1, "loss_weights": {"global_report": 1}, "lr_multipliers": {"text": None}},
         r"'lr_multipliers.text' must be a number"),
        ({"name": "a", "steps": 1, "loss_weights": {"global_report": 1}, "use_rois": "yes"}, "'use_rois' must be true or false"),
        ({"name": ["a"], "steps": 1, "loss_weights": {"global_report": 1}}, "needs a non-empty 'name'"),
    ],
)
def test_bad_stages_are_named(stage, message):
    with pytest.raises(ValueError, match=message):
        StagedSchedule([stage], max_steps=10)


def test_duplicate_names_and_empty_schedules_are_rejected():
    stage = {"name": "a", "steps": 1, "loss_weights": {"global_report": 1}}
    with pytest.raises(ValueError, match="unique"):
        StagedSchedule([stage, stage], max_steps=10)
    with pytest.raises(ValueError, match="at least one stage"):
        StagedSchedule([], max_steps=10)


def test_every_model_parameter_has_a_group():
    groups = {parameter_group_of(name) for name, _ in tiny_model().named_parameters()}
    assert groups == set(PARAMETER_GROUPS)
    with pytest.raises(ValueError, match="no schedule group"):
        parameter_group_of("classifier.weight")


def test_schedules_by_name():
    assert StagedSchedule("progressive", max_steps=100).boundaries() == StagedSchedule(PROGRESSIVE_STAGES, 100).boundaries()
    assert resolve_schedule("joint") == DEFAULT_STAGES and resolve_schedule("joint") is not DEFAULT_STAGES
    with pytest.raises(ValueError, match=r"unknown schedule 'paper'; named schedules: \['joint', 'progressive'\]"):
        StagedSchedule("paper", max_steps=10)


@pytest.mark.parametrize(("schedule", "message"), [
    (["progressive"], r"schedule\[0\]: a stage must be a mapping .* got 'progressive'"),
    ([{"name": "a", "steps": 1, "loss_weights": {"global_report": 1}}, 3], r"schedule\[1\]: a stage must be a mapping"),
    ({"name": "a", "steps": 1}, "a schedule name .* or a list of stages, got dict"),
    (7, "got int"),
])
def test_a_schedule_that_is_not_a_list_of_mappings_is_named(schedule, message):
    with pytest.raises(ValueError, match=message):
        StagedSchedule(schedule, max_steps=10)
