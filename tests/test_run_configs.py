"""The shipped launch configs parse, and the base run YAML resolves into valid pieces."""

from pathlib import Path

import pytest
import yaml

from modeling_regionmed_clip import RegionMedCLIPConfig
from training_scripts.schedule import StagedSchedule
from training_scripts.train import build_parser, resolve_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "training_scripts" / "configs"


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"accelerate_{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == 8


def test_fsdp_wraps_our_transformer_blocks():
    fsdp = yaml.safe_load((CONFIGS / "accelerate_fsdp.yaml").read_text())["fsdp_config"]
    import modeling_regionmed_clip.modeling_regionmed_clip as modeling

    for name in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert hasattr(modeling, name), name
    assert fsdp["fsdp_use_orig_params"] is True  # per-group learning rates need the original parameters


def test_base_run_yaml_resolves(tmp_path):
    args = build_parser().parse_args(["--config", str(CONFIGS / "base_run.yaml"), "--data", str(tmp_path),
                                      "--output-dir", str(tmp_path / "out")])
    run = resolve_run_config(args)
    assert run["model"]["preset"] == "base" and run["training_args"]["max_steps"] == 100000
    config = RegionMedCLIPConfig.from_preset("base", **run["model"]["overrides"])
    assert config._attn_implementation == "xformers"
    StagedSchedule(run["schedule"], run["training_args"]["max_steps"])


def test_flags_win_over_yaml_and_bad_sections_are_named(tmp_path):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(yaml.safe_dump({"training_args": {"max_steps": 50, "learning_rate": 1.0}}))
    args = build_parser().parse_args(["--config", str(yaml_path), "--data", "d", "--output-dir", "o",
                                      "--learning-rate", "0.01"])
    run = resolve_run_config(args)
    assert run["training_args"]["learning_rate"] == 0.01 and run["training_args"]["max_steps"] == 50
    yaml_path.write_text(yaml.safe_dump({"trainer": {}}))
    with pytest.raises(ValueError, match=r"unknown sections \['trainer'\]"):
        resolve_run_config(args)
    with pytest.raises(ValueError, match="max_steps is required"):
        resolve_run_config(build_parser().parse_args(["--data", "d", "--output-dir", "o"]))
