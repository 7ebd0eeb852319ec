import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError

from regionmed_clip.modeling_regionmed_clip import (
    CONFIG_ERRORS,
    PRESETS,
    RegionMedCLIPConfig,
    RegionMedCLIPModel,
    RegionMedCLIPTextConfig,
    RegionMedCLIPVisionConfig,
)


def test_tiny_preset_is_under_one_million_parameters():
    model = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset("tiny"))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_base_preset_is_vit_b16_with_pubmedbert_sized_text():
    config = RegionMedCLIPConfig.from_preset("base")
    vision, text = config.vision_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (224, 16, 768, 12)
    assert (vision.num_attention_heads, vision.intermediate_size) == (12, 3072)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.vocab_size) == (768, 12, 12, 30522)
    for name in PRESETS:
        assert RegionMedCLIPConfig.from_preset(name).text_config.max_position_embeddings >= 256


def test_preset_overrides_merge_into_sub_configs():
    config = RegionMedCLIPConfig.from_preset("tiny", max_rois=6, vision_config={"num_hidden_layers": 3})
    assert config.max_rois == 6
    assert config.vision_config.num_hidden_layers == 3
    assert config.vision_config.hidden_size == PRESETS["tiny"]["vision_config"]["hidden_size"]
    assert PRESETS["tiny"]["vision_config"]["num_hidden_layers"] == 2, "presets must not be mutated"


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*base.*tiny"):
        RegionMedCLIPConfig.from_preset("huge")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vision_config": {"hidden_size": 66}}, "hidden_size"),
        ({"vision_config": {"image_size": 60}}, "image_size"),
        ({"text_config": {"num_attention_heads": 5}}, "hidden_size"),
        ({"text_config": {"pad_token_id": 99999}}, "pad_token_id"),
        ({"roi_image_size": 20}, "roi_image_size"),
        ({"roi_fusion_heads": 3}, "roi_fusion_heads"),
        ({"max_rois": 0}, "max_rois"),
        ({"roi_gate_init": float("nan")}, "roi_gate_init"),
        ({"logit_scale_init_value": 5.0}, "logit_scale_init_value"),
        ({"vision_config": {"attention_dropout": 1.5}}, "attention_dropout"),
    ],
)
def test_invalid_combinations_name_the_field(overrides, field):
    with pytest.raises(CONFIG_ERRORS, match=field):
        RegionMedCLIPConfig.from_preset("tiny", **overrides)


def test_sub_config_of_wrong_type_names_the_field():
    with pytest.raises(CONFIG_ERRORS, match="vision_config"):
        RegionMedCLIPConfig(vision_config=42)


@pytest.mark.parametrize(
    ("config_class", "fields", "field"),
    [(RegionMedCLIPVisionConfig, {"hidden_size": "64"}, "hidden_size"),
     (RegionMedCLIPVisionConfig, {"num_hidden_layers": True}, "num_hidden_layers"),
     (RegionMedCLIPTextConfig, {"pooling": "max"}, "pooling"),
     (RegionMedCLIPConfig, {"max_rois": 2.5}, "max_rois")],
)
def test_field_types_are_checked_on_creation(config_class, fields, field):
    # transformers v5's strict dataclass configs: a wrong type is refused by name, not stored
    with pytest.raises(StrictDataclassFieldValidationError, match=field):
        config_class(**fields)


def test_field_types_are_checked_on_assignment():
    config = RegionMedCLIPConfig.from_preset("tiny")
    with pytest.raises(StrictDataclassFieldValidationError, match="roi_image_size"):
        config.roi_image_size = "32"
    assert config.roi_image_size == 32


def test_config_round_trips_through_save_pretrained(tmp_path):
    config = RegionMedCLIPConfig.from_preset("tiny", roi_gate_init=0.25)
    config.save_pretrained(tmp_path)
    loaded = RegionMedCLIPConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.vision_config.patch_size == config.vision_config.patch_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"max_roi": 3}, r"from_preset\('tiny'\) got unknown config fields \['max_roi'\]"),
     ({"vision_config": {"hidden_sise": 32}}, r"vision_config got unknown config fields \['hidden_sise'\]")],
)
def test_typos_in_overrides_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        RegionMedCLIPConfig.from_preset("tiny", **overrides)


def test_attention_backend_is_a_legal_override():
    assert RegionMedCLIPConfig.from_preset("tiny", attn_implementation="eager")._attn_implementation == "eager"
