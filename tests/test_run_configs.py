"""The shipped launch configs parse, and the base run YAML resolves into valid pieces."""

import re
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_failing

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig
from regionmed_clip.training_scripts.schedule import DEFAULT_STAGES, PROGRESSIVE_STAGES, StagedSchedule
from regionmed_clip.training_scripts.train import main as train_main
from regionmed_clip.training_scripts.train import parse_command, resolve_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "training_scripts" / "configs"


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"accelerate_{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == 8


def test_fsdp_wraps_our_transformer_blocks():
    fsdp = yaml.safe_load((CONFIGS / "accelerate_fsdp.yaml").read_text())["fsdp_config"]
    import regionmed_clip.modeling_regionmed_clip.modeling_regionmed_clip as modeling

    for name in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert hasattr(modeling, name), name
    assert fsdp["fsdp_use_orig_params"] is True  # per-group learning rates need the original parameters


def test_base_run_yaml_resolves(tmp_path):
    args = parse_command(["--config", str(CONFIGS / "base_run.yaml"), "--data", str(tmp_path),
                                      "--output-dir", str(tmp_path / "out")])
    run = resolve_run_config(*args)
    assert run["model"]["preset"] == "base" and run["training_args"]["max_steps"] == 100000
    config = RegionMedCLIPConfig.from_preset("base", **run["model"]["overrides"])
    assert config._attn_implementation == "xformers"
    StagedSchedule(run["schedule"], run["training_args"]["max_steps"])


def test_flags_win_over_yaml_and_bad_sections_are_named(tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(yaml.safe_dump({"training_args": {"max_steps": 50, "learning_rate": 1.0}}))
    args = parse_command(["--config", str(yaml_path), "--data", str(tmp_path), "--output-dir", "o",
                                      "--learning-rate", "0.01"])
    run = resolve_run_config(*args)
    assert run["training_args"]["learning_rate"] == 0.01 and run["training_args"]["max_steps"] == 50
    yaml_path.write_text(yaml.safe_dump({"trainer": {}}))
    with pytest.raises(ValueError, match=r"unknown sections \['trainer'\]"):
        resolve_run_config(*args)
    with pytest.raises(ValueError, match="max_steps is required"):
        resolve_run_config(*parse_command(["--data", str(tmp_path), "--output-dir", "o"]))


def test_every_training_argument_is_a_flag_and_merges_defaults_then_yaml_then_flags(tmp_path):
    from transformers import TrainingArguments

    from regionmed_clip.training_scripts.arguments import TrainingCommandParser
    from regionmed_clip.training_scripts.train import DEFAULT_TRAINING_ARGS, TrainOptions

    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(yaml.safe_dump({"training_args": {"max_steps": 50, "weight_decay": 0.3, "warmup_steps": 7}}))
    base = ["--config", str(yaml_path), "--data", str(tmp_path), "--output-dir", "o"]
    training_args = resolve_run_config(*parse_command(base))["training_args"]
    # no flag given: the YAML wins over the defaults, and the defaults fill the rest
    assert training_args["weight_decay"] == 0.3 and training_args["warmup_steps"] == 7
    assert training_args["learning_rate"] == DEFAULT_TRAINING_ARGS["learning_rate"]
    assert "gradient_accumulation_steps" not in training_args  # left to TrainingArguments' own default
    # fields regionmed-train never named are flags too, with dashes or underscores; a flag wins over the YAML
    training_args = resolve_run_config(*parse_command(
        [*base, "--gradient-accumulation-steps", "3", "--weight_decay", "0.1", "--lr-scheduler-type", "linear",
         "--bf16", "--batch-size", "5"]))["training_args"]
    assert training_args["gradient_accumulation_steps"] == 3 and training_args["weight_decay"] == 0.1
    assert training_args["lr_scheduler_type"] == "linear" and training_args["bf16"] is True
    assert training_args["per_device_train_batch_size"] == 5 and training_args["warmup_steps"] == 7
    assert TrainingArguments(**{**training_args, "bf16": False}).gradient_accumulation_steps == 3
    help_text = TrainingCommandParser("regionmed-train", "", TrainOptions).parser.format_help()
    assert "--dataloader-num-workers" in help_text and "--eval-strategy" in help_text


@pytest.mark.parametrize(("yaml_schedule", "flag", "expected"), [
    ("progressive", None, PROGRESSIVE_STAGES),
    (None, None, DEFAULT_STAGES),
    ("progressive", "joint", DEFAULT_STAGES),
    (None, "progressive", PROGRESSIVE_STAGES),
])
def test_named_schedules_in_yaml_and_as_a_flag(tmp_path, yaml_schedule, flag, expected):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(yaml.safe_dump({"schedule": yaml_schedule} if yaml_schedule else {}))
    argv = ["--config", str(yaml_path), "--data", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--max-steps", "9"]
    run = resolve_run_config(*parse_command(argv + (["--schedule", flag] if flag else [])))
    assert run["schedule"] == expected  # saved resolved in run_config.yaml: the run says what it trained
    assert [name for name, _ in StagedSchedule(run["schedule"], 9).boundaries()] == [stage["name"] for stage in expected]


@pytest.mark.parametrize(("content", "message"), [
    ("schedule: paper\n", r"unknown schedule 'paper'"),
    ("schedule: [progressive]\n", r"schedule\[0\]: a stage must be a mapping"),
    ("- training_args\n", "must be a mapping with sections .* got a list"),
    ("training_args: {max_stepz: 3}\n", r"unknown training_args \['max_stepz'\]"),
    ("training_args: [1]\n", "section 'training_args' must be a mapping"),
    ("model: {overrides: {max_rois: 0}}\n", "model: "),
    ("schedule: [\n", "is not valid YAML"),
])
def test_bad_run_yaml_is_one_usage_error_naming_the_file(tmp_path, capsys, content, message):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(content)
    (tmp_path / "data").mkdir()
    line = run_failing(train_main, ["--config", str(yaml_path), "--data", str(tmp_path / "data"), "--output-dir",
                                    str(tmp_path / "o"), "--max-steps", "2"], capsys, 2, str(yaml_path))
    assert re.search(message, line), line
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize(("argv", "names"), [
    (["--max-steps", "0"], ["--max-steps", "positive"]),
    (["--batch-size", "-1"], ["--batch-size"]),
    (["--threads", "0"], ["--threads"]),
    (["--schedule", "paper"], ["--schedule", "progressive"]),
    (["--config", "missing.yaml"], ["--config", "missing.yaml", "no such file"]),
    (["--data", "no-such-folder"], ["--data", "no-such-folder"]),
    (["--output-dir", "a-file"], ["--output-dir", "a-file", "is a file"]),
])
def test_bad_train_arguments_are_usage_errors(tmp_path, capsys, monkeypatch, argv, names):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "a-file").write_text("x")
    base = {"--data": "data", "--output-dir": "out", "--max-steps": "2"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    run_failing(train_main, [part for pair in base.items() for part in pair], capsys, 2, *names)


def test_window_sampling_is_set_under_data_and_the_ablation_turns_it_off(tmp_path):
    from regionmed_clip.data.synthetic import write_synthetic_dataset
    from regionmed_clip.training_scripts.train import build_trainer

    write_synthetic_dataset(tmp_path / "data", n=20, seed=0)

    def collator_of(config: Path | None, **data) -> object:
        argv = ["--preset", "tiny", "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
                *(["--config", str(config)] if config else [])]
        run = resolve_run_config(*parse_command(argv))
        run["data"].update(data)
        return build_trainer(run)[0].data_collator

    default = collator_of(None)
    assert (default.windows_per_image, default.window_only_fraction) == (4, 0.5)
    assert default.background_caption == RegionMedCLIPConfig.from_preset("tiny").background_caption
    assert collator_of(CONFIGS / "no_background_windows.yaml").windows_per_image == 0
    assert collator_of(None, window_only_fraction=0.25).window_only_fraction == 0.25
    with pytest.raises(ValueError, match="windows_per_image must be an int >= 0, got -1"):
        collator_of(None, windows_per_image=-1)
    with pytest.raises(ValueError, match="window_only_fraction must be in"):
        collator_of(None, window_only_fraction="half")


def test_pretrained_start_recipe_resolves_with_a_converted_folder_on_top(tmp_path):
    """training_scripts/configs/pretrained_start.yaml plus `model: {pretrained: DIR}`: one joint stage with every
    loss term on at its default weight, ROIs fed, what the source knows (towers, projections, temperature) at
    x0.1 and the new ROI processor at x1.0 from the first step."""
    from regionmed_clip.training_scripts.losses import DEFAULT_LOSS_WEIGHTS, LOSS_TERMS

    recipe = yaml.safe_load((CONFIGS / "pretrained_start.yaml").read_text())
    assert set(recipe) == {"schedule"}  # the model folder is given on top, never in the shipped recipe
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({**recipe, "model": {"pretrained": str(tmp_path / "converted")}}))
    run = resolve_run_config(*parse_command(["--config", str(run_yaml), "--data", str(tmp_path), "--output-dir",
                                             str(tmp_path / "out"), "--max-steps", "600"]))
    assert run["model"]["pretrained"] == str(tmp_path / "converted")
    (stage,) = StagedSchedule(run["schedule"], 600).stages
    assert (stage.start, stage.end, stage.use_rois) == (0, 600, True)
    assert dict(stage.loss_weights) == DEFAULT_LOSS_WEIGHTS and all(stage.uses(term) for term in LOSS_TERMS)
    assert {group: stage.lr_multiplier(group) for group in ("vision", "text", "projections", "temperature", "roi")} == {
        "vision": 0.1, "text": 0.1, "projections": 0.1, "temperature": 0.1, "roi": 1.0}
    assert not stage.frozen_groups()
