"""`regionmed-convert --from clip`: a transformers `CLIPModel` folder (e.g. PubMedCLIP, OpenAI's CLIP) -> a
RegionMed-CLIP model whose box-free image embedding and caption embedding equal the source's.

How equality holds at conversion (no boxes): the vision tower already is CLIP's (same parameter names,
pre-LayerNorm, `post_layernorm` on the CLS token; CLIP's bias-free patch convolution gets a zero bias), and
the text tower is set to CLIP's text transformer (pre-LayerNorm causal layers, no embedding LayerNorm or
token types, a final LayerNorm, pooled at the end-of-text token). `proposal_window_sizes=[]` makes the
whole-image term the projected CLS token, exactly `CLIPModel.get_image_features`; the box-free centre is zero
and does not move (`box_free_center_momentum=0`); the proposal and region pools enter through
`tanh(pool_gate)`, 0 at conversion, so the processor's proposals add exactly nothing until training opens
the gate. Both projections and the temperature are CLIP's.
"""

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, PreTrainedTokenizerBase

from regionmed_clip.modeling_regionmed_clip import (
    RegionMedCLIPConfig,
    RegionMedCLIPModel,
    RegionMedCLIPTextConfig,
    RegionMedCLIPVisionConfig,
)
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, load_tokenizer
from regionmed_clip.processing.tokenization_regionmed_clip import TOKENIZER_FILES

from .conversion import EQUAL_AT_CONVERSION, Conversion, load_state_dict, rename_weights

__all__ = ["clip_state_dict", "convert_clip"]

# Source key -> our key. Our vision tower uses CLIP-vision names; CLIP's text transformer names its two
# embedding tables differently from our BERT-style embeddings.
_LAYER = r"encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
_RULES: list[tuple[str, str]] = [
    (rf"vision_model\.(embeddings\.(?:class_embedding|patch_embedding\.weight|position_embedding\.weight)"
     rf"|(?:pre_layrnorm|post_layernorm)\.(?:weight|bias)|{_LAYER})", r"vision_model.\1"),
    (r"text_model\.embeddings\.token_embedding\.weight", "text_model.embeddings.word_embeddings.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text_model.embeddings.position_embeddings.weight"),
    (rf"text_model\.({_LAYER}|final_layer_norm\.(?:weight|bias))", r"text_model.\1"),
    (r"(visual_projection|text_projection)\.weight", r"\1.weight"),
    (r"logit_scale", "logit_scale"),
]
_DROPPED: list[tuple[str, str]] = [
    (r"(?:vision|text)_model\.embeddings\.position_ids", "a constant index buffer (older checkpoints saved it), "
                                                        "rebuilt by the model"),
]
# What the conversion leaves at its initialisation: the region machinery (closed gates) and the box-free centre.
_FRESH = re.compile(r"roi_processor\..*|box_free_center")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_BICUBIC = 3  # PIL's (and transformers' PILImageResampling) bicubic


def convert_clip(source_dir: Path, *, tokenizer: Path | None = None) -> Conversion:
    """A transformers `CLIPModel` folder (config.json + model.safetensors or pytorch_model.bin, optionally
    sharded; tokenizer files and preprocessor_config.json beside them) -> the converted model, its processor
    (the source's preprocessing and tokenizer: CLIP's token ids) and the account of every source weight.

    `tokenizer`: a folder with CLIP's tokenizer files when `source_dir` holds none. Raises ValueError for a
    config that is not CLIP's, a weight the converter cannot place (naming every such key) or preprocessing
    our image processor cannot reproduce."""
    source_dir = Path(source_dir)
    clip_config = _clip_config(source_dir)
    state = clip_state_dict(source_dir)
    mapped, used, dropped = _map_weights(state)

    tok = _tokenizer(source_dir, tokenizer, clip_config)
    config = RegionMedCLIPConfig(
        vision_config=_vision_config(clip_config),
        text_config=_text_config(clip_config, tok),
        projection_dim=clip_config.projection_dim,
        # the weight is loaded below; the field only has to be a legal start (CLIP's trained 4.6052 > log(100))
        logit_scale_init_value=min(float(mapped["logit_scale"]), math.log(100.0)),
        roi_image_size=_roi_image_size(clip_config.vision_config),
        roi_fusion_heads=clip_config.vision_config.num_attention_heads,
        vqa_fusion_heads=max(h for h in range(1, 9) if clip_config.projection_dim % h == 0),
        **EQUAL_AT_CONVERSION,
    )
    model = RegionMedCLIPModel(config)
    mapped["logit_scale"] = mapped["logit_scale"].reshape(model.logit_scale.shape)
    # CLIP's patch convolution has no bias; ours does, and zero makes them the same function.
    mapped["vision_model.embeddings.patch_embedding.bias"] = torch.zeros(config.vision_config.hidden_size)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    not_fresh = [key for key in missing if not _FRESH.fullmatch(key)]
    if unexpected or not_fresh:  # a converter bug, not a bad checkpoint: every source key was placed above
        raise RuntimeError(f"the converted weights do not fit the model: unexpected {unexpected}, missing {not_fresh}")
    model.eval()
    return Conversion("clip", model, _processor(source_dir, config, tok), used, dropped)


def clip_state_dict(source_dir: Path) -> dict[str, torch.Tensor]:
    """The source's tensors: `model.safetensors` (preferred) or `pytorch_model.bin` (read with
    `weights_only=True`), or the shards an `*.index.json` lists."""
    for name in _WEIGHT_FILES:
        if (source_dir / name).is_file():
            return load_state_dict(source_dir / name)
    for name in _INDEX_FILES:
        if (source_dir / name).is_file():
            shards = sorted(set(json.loads((source_dir / name).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_state_dict(source_dir / shard))
            return state
    raise FileNotFoundError(f"no CLIP weights in {str(source_dir)!r}: expected one of "
                            f"{', '.join(_WEIGHT_FILES + _INDEX_FILES)}")


def _clip_config(source_dir: Path) -> CLIPConfig:
    config_file = source_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(source_dir)!r}: --from clip needs a transformers CLIPModel folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "clip":
        raise ValueError(f"{str(config_file)!r} has model_type {model_type!r}; --from clip needs a CLIPModel "
                         "folder (model_type 'clip')")
    return CLIPConfig.from_pretrained(source_dir)


def _map_weights(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Our state dict, the source keys used and those dropped (with why); ValueError naming every key that
    neither a rule nor a drop reason covers."""
    mapped, used, dropped = rename_weights(state, _RULES, _DROPPED, "--from clip")
    missing = [name for name in ("logit_scale", "visual_projection.weight", "text_projection.weight") if name not in mapped]
    if missing:
        raise ValueError(f"the CLIP checkpoint lacks {missing}: --from clip needs a full CLIPModel (both towers, "
                         "both projections and the temperature)")
    return mapped, used, dropped


def _vision_config(clip_config: CLIPConfig) -> RegionMedCLIPVisionConfig:
    vision = clip_config.vision_config
    return RegionMedCLIPVisionConfig(
        image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.num_channels,
        hidden_size=vision.hidden_size, num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads, intermediate_size=vision.intermediate_size,
        hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps,
        attention_dropout=vision.attention_dropout, hidden_dropout=0.0, pre_layernorm=True, pooling="cls",
    )


def _text_config(clip_config: CLIPConfig, tokenizer: PreTrainedTokenizerBase) -> RegionMedCLIPTextConfig:
    text = clip_config.text_config
    eos = text.eos_token_id
    if not isinstance(eos, int):
        raise ValueError(f"the CLIP text config's eos_token_id must be one id, got {eos!r}")
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the CLIP text tower only {text.vocab_size} "
                         "embeddings: is it this checkpoint's tokenizer?")
    return RegionMedCLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, intermediate_size=text.intermediate_size,
        hidden_act=text.hidden_act, max_position_embeddings=text.max_position_embeddings,
        layer_norm_eps=text.layer_norm_eps, attention_dropout=text.attention_dropout, hidden_dropout=0.0,
        # CLIP's text transformer: pre-LN causal layers, no embedding LayerNorm or token types, a final
        # LayerNorm, pooled at the end-of-text token (transformers' rule, legacy eos_token_id 2 included)
        norm_first=True, causal=True, embedding_layer_norm=False, type_vocab_size=0, final_layer_norm=True,
        pooling="eos", eos_token_id=eos,
        # the model pads packed captions as the tokenizer does (CLIP: with its end-of-text token)
        pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.bos_token_id,
    )


def _roi_image_size(vision: Any) -> int:
    """Half the view, in whole patches (112 for ViT-B/16 at 224, 96 for ViT-B/32)."""
    return max(vision.patch_size, vision.image_size // 2 // vision.patch_size * vision.patch_size)


def _tokenizer(source_dir: Path, tokenizer: Path | None, clip_config: CLIPConfig) -> PreTrainedTokenizerBase:
    folder = source_dir if any((source_dir / name).is_file() for name in TOKENIZER_FILES) else tokenizer
    if folder is None:
        raise ValueError(f"no tokenizer files in {str(source_dir)!r} ({', '.join(TOKENIZER_FILES)}, or vocab.json "
                         "with merges.txt): pass --tokenizer DIR with the CLIP checkpoint's tokenizer")
    max_length = clip_config.text_config.max_position_embeddings
    loaded = load_tokenizer(folder, model_max_length=max_length)
    # the text tower has max_position_embeddings positions (77 for CLIP): captions are truncated to them
    loaded.model_max_length = min(loaded.model_max_length, max_length)
    loaded.init_kwargs["model_max_length"] = loaded.model_max_length
    return loaded


def _processor(source_dir: Path, config: RegionMedCLIPConfig, tokenizer: PreTrainedTokenizerBase
               ) -> RegionMedCLIPProcessor:
    image_size = config.vision_config.image_size
    settings = _image_settings(source_dir / "preprocessor_config.json", image_size)
    image_processor = RegionMedCLIPImageProcessor(image_size=image_size, roi_size=config.roi_image_size,
                                                  max_rois=config.max_rois, resize_mode="center_crop", **settings)
    return RegionMedCLIPProcessor(image_processor, tokenizer)


def _image_settings(path: Path, image_size: int) -> dict[str, Any]:
    """Our image processor's settings for a `CLIPImageProcessor` config (resize the shorter side, centre crop,
    rescale by 1/255, normalise): its resampling, mean and std. Without the file, CLIPImageProcessor's
    defaults (bicubic, OpenAI's mean and std: our processor's own). ValueError for a pipeline ours does not
    reproduce (another crop than the resize, no resize or crop, another rescale)."""
    if not path.is_file():
        return {"resample": _BICUBIC}
    source = json.loads(path.read_text())

    def side(value: Any, name: str) -> int:
        if isinstance(value, int):
            return value
        if isinstance(value, dict) and "shortest_edge" in value and len(value) == 1:
            return value["shortest_edge"]
        if isinstance(value, dict) and value.get("height") == value.get("width") and value.get("height"):
            return value["height"]
        raise ValueError(f"{str(path)!r}: {name} {value!r} is not a shortest edge or a square")

    problems = []
    resize = side(source.get("size", {"shortest_edge": image_size}), "size")
    crop = side(source.get("crop_size", resize), "crop_size")
    if (resize, crop) != (image_size, image_size):
        problems.append(f"size {resize} and crop_size {crop} must both be the tower's image_size {image_size} "
                        "(our processor resizes the shorter side to the view and crops its centre)")
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not source.get(flag, True):
            problems.append(f"{flag} is false")
    if not math.isclose(source.get("rescale_factor", 1 / 255), 1 / 255):
        problems.append(f"rescale_factor {source['rescale_factor']} is not 1/255")
    if problems:
        raise ValueError(f"{str(path)!r}: the source's preprocessing cannot be reproduced: {'; '.join(problems)}")
    settings: dict[str, Any] = {"resample": int(source.get("resample", _BICUBIC))}
    settings.update({key: list(source[key]) for key in ("image_mean", "image_std") if key in source})
    return settings
