"""Start a RegionMed-CLIP model from pretrained towers: transformers ViT, CLIP-vision or full CLIP
checkpoints for the vision tower and BERT (e.g. PubMedBERT) for the text tower.

Checkpoint conversion is a training-time step, so it lives here and not in the shipped remote code:
the vision tower uses CLIP-vision parameter names and the text tower BERT's layout, and the rules
below map the source state dicts onto them (loaded with `strict=True`)."""

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedConfig

from regionmed_clip.modeling_regionmed_clip import (
    RegionMedCLIPConfig,
    RegionMedCLIPModel,
    RegionMedCLIPTextConfig,
    RegionMedCLIPVisionConfig,
)
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, load_tokenizer
from regionmed_clip.processing.tokenization_regionmed_clip import TOKENIZER_FILES

from .conversion import Conversion, rename_weights

__all__ = ["BERT_RULES", "convert_vit_bert", "model_from_vision_text_pretrained"]


def model_from_vision_text_pretrained(
    vision_path: str | Path, text_path: str | Path, **config_fields: Any
) -> RegionMedCLIPModel:
    """A `RegionMedCLIPModel` whose towers are copied from local checkpoints.

    vision_path: a transformers ViT (`vit`), CLIP vision (`clip_vision_model`) or full CLIP (`clip`)
    folder; text_path: a BERT folder (e.g. PubMedBERT). `config_fields` set the other top-level
    `RegionMedCLIPConfig` fields (projection_dim, max_rois, roi_* ...); the ROI processor,
    projections and temperature start fresh.
    """
    return _towers_from_pretrained(vision_path, text_path, config_fields)[0]


def convert_vit_bert(vision_path: str | Path, text_path: str | Path, *, tokenizer: str | Path | None = None,
                     **config_fields: Any) -> Conversion:
    """`regionmed-convert --from vit-bert`: `model_from_vision_text_pretrained` with its processor (the vision
    folder's preprocessing when it has a `preprocessor_config.json`, the BERT folder's tokenizer or `tokenizer`)
    and the account of every source weight (`vision/...`, `text/...`). The towers are copied; the projections,
    temperature and region modules start fresh, so this start knows no image-text alignment."""
    model, used, dropped = _towers_from_pretrained(vision_path, text_path, config_fields)
    tokenizer_dir = Path(text_path) if _has_tokenizer(Path(text_path)) else tokenizer
    if tokenizer_dir is None:
        raise ValueError(f"no tokenizer files in {str(text_path)!r} ({', '.join(TOKENIZER_FILES)}): pass --tokenizer DIR")
    preprocessing = Path(vision_path) / "preprocessor_config.json"
    image_settings = {}
    if preprocessing.is_file():
        source = json.loads(preprocessing.read_text())
        image_settings = {key: source[key] for key in ("image_mean", "image_std") if key in source}
    image_processor = RegionMedCLIPImageProcessor(image_size=model.config.vision_config.image_size,
                                                  resize_mode="center_crop", max_rois=model.config.max_rois,
                                                  **image_settings)
    processor = RegionMedCLIPProcessor(image_processor, load_tokenizer(tokenizer_dir))
    return Conversion("vit-bert", model, processor, used, dropped)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _towers_from_pretrained(vision_path: str | Path, text_path: str | Path, config_fields: dict[str, Any]
                            ) -> tuple[RegionMedCLIPModel, list[str], dict[str, str]]:
    """The model with both towers copied, the source weights used and those dropped (with why)."""
    RegionMedCLIPConfig.check_fields(config_fields, "model_from_vision_text_pretrained",
                                     exclude={"vision_config", "text_config"})
    vision_source = AutoModel.from_pretrained(vision_path)
    vision_hf_config = vision_source.config
    if vision_hf_config.model_type == "clip":
        vision_source, vision_hf_config = vision_source.vision_model, vision_hf_config.vision_config
    vision_state = vision_source.state_dict()
    vision_config, vision_mapped, vision_dropped = _vision_tower_from_transformers(vision_hf_config, vision_state)

    text_model_type = AutoConfig.from_pretrained(text_path).model_type
    if text_model_type != "bert":
        raise ValueError(f"text_path must hold a BERT checkpoint, got model_type {text_model_type!r}")
    text_source = AutoModel.from_pretrained(text_path, add_pooling_layer=False)
    cls_token_id = RegionMedCLIPTextConfig().cls_token_id
    if _has_tokenizer(Path(text_path)):
        cls_token_id = AutoTokenizer.from_pretrained(text_path).cls_token_id
    text_state = text_source.state_dict()
    text_config, text_mapped, text_dropped = _text_tower_from_bert(text_source.config, text_state, cls_token_id)

    # the fusion attends with the vision tower's width: its head count always divides it
    config_fields = {"roi_fusion_heads": vision_config.num_attention_heads, **config_fields}
    config = RegionMedCLIPConfig(vision_config=vision_config, text_config=text_config, **config_fields)
    model = RegionMedCLIPModel(config)
    model.vision_model.load_state_dict(vision_mapped, strict=True)
    model.text_model.load_state_dict(text_mapped, strict=True)
    used = [f"vision/{key}" for key in vision_state if key not in vision_dropped]
    used += [f"text/{key}" for key in text_state if key not in text_dropped]
    dropped = {**{f"vision/{key}": why for key, why in vision_dropped.items()},
               **{f"text/{key}": why for key, why in text_dropped.items()}}
    return model, used, dropped


# transformers' ViT changed its parameter names in v5.2x; each rule accepts the old and the new layout.
_VIT_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_VIT_RULES = [
    (r"embeddings\.cls_token", "embeddings.class_embedding"),
    (r"embeddings\.position_embeddings", "embeddings.position_embedding.weight"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (_VIT_LAYER + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.q_proj.\2"),
    (_VIT_LAYER + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.k_proj.\2"),
    (_VIT_LAYER + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.v_proj.\2"),
    (_VIT_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (_VIT_LAYER + r"layernorm_before\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (_VIT_LAYER + r"layernorm_after\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (_VIT_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (_VIT_LAYER + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"post_layernorm.\1"),
]

# Our vision tower uses CLIP's own parameter names; only a `vision_model.` prefix may need to go.
_CLIP_VISION_RULES = [(r"(?:vision_model\.)?(.*)", r"\1")]

BERT_RULES = [
    (r"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)\.(weight|bias)", r"embeddings.\1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"encoder.layers.\1.self_attn.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"encoder.layers.\1.self_attn.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"encoder.layers.\1.self_attn.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
]


def _vision_tower_from_transformers(
    hf_config: PreTrainedConfig, state: dict[str, torch.Tensor]
) -> tuple[RegionMedCLIPVisionConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Map a transformers ViT or CLIP-vision config and state dict onto our vision tower: `(config, our state
    dict, source name -> why dropped)`."""
    common = {
        "image_size": hf_config.image_size,
        "patch_size": hf_config.patch_size,
        "num_channels": hf_config.num_channels,
        "hidden_size": hf_config.hidden_size,
        "num_hidden_layers": hf_config.num_hidden_layers,
        "num_attention_heads": hf_config.num_attention_heads,
        "intermediate_size": hf_config.intermediate_size,
        "hidden_act": hf_config.hidden_act,
        "layer_norm_eps": hf_config.layer_norm_eps,
    }
    if hf_config.model_type == "vit":
        if not getattr(hf_config, "qkv_bias", True):
            raise ValueError("ViT checkpoints with qkv_bias=False are not supported: our attention has biases")
        config = RegionMedCLIPVisionConfig(**common, pre_layernorm=False)
        mapped, _, dropped = rename_weights(
            state, _VIT_RULES, [(r"pooler\..*|embeddings\.mask_token",
                                 "ViT's pooler / masked-image-modeling token: the model pools its own way")], "vision_path")
        mapped["embeddings.position_embedding.weight"] = mapped["embeddings.position_embedding.weight"][0]
        mapped["embeddings.class_embedding"] = mapped["embeddings.class_embedding"].reshape(-1)
        return config, mapped, dropped
    if hf_config.model_type == "clip_vision_model":
        config = RegionMedCLIPVisionConfig(**common, pre_layernorm=True)
        mapped, _, dropped = rename_weights(
            state, _CLIP_VISION_RULES, [(r".*position_ids", "a constant index buffer, rebuilt by the model")],
            "vision_path")
        # CLIP's patch convolution has no bias; ours does, and zero makes them the same function.
        mapped["embeddings.patch_embedding.bias"] = torch.zeros(hf_config.hidden_size)
        return config, mapped, dropped
    raise ValueError(
        f"vision_path must hold a ViT, CLIP vision or CLIP checkpoint, got model_type {hf_config.model_type!r}"
    )


def _text_tower_from_bert(
    hf_config: PreTrainedConfig, state: dict[str, torch.Tensor], cls_token_id: int
) -> tuple[RegionMedCLIPTextConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Map a transformers BERT config and state dict onto our text tower: `(config, our state dict, source name ->
    why dropped)`."""
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only BERT checkpoints with absolute position embeddings are supported")
    config = RegionMedCLIPTextConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        hidden_act=hf_config.hidden_act,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        hidden_dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        cls_token_id=cls_token_id,
    )
    mapped, _, dropped = rename_weights(
        state, BERT_RULES, [(r"pooler\..*|.*position_ids|.*token_type_ids",
                             "BERT's pooler (the model pools the last hidden state) or an index buffer")], "text_path")
    return config, mapped, dropped
