"""`regionmed-convert --from biomedclip`: an open_clip folder as BiomedCLIP publishes it (`open_clip_config.json`
and `open_clip_pytorch_model.bin` or `.safetensors`) -> a RegionMed-CLIP model and processor.

The source is open_clip's `CustomTextCLIP`: a timm ViT image tower (`TimmModel`: fused qkv, CLS pooling after the
final norm, a linear head without bias) and a Hugging Face BERT text tower (`HFTextEncoder`: the CLS token of the
last hidden state, an MLP projection Linear -> GELU -> Linear without biases, 768 -> 640 -> 512), and `logit_scale`.
Our vision tower takes the ViT (CLIP-vision names, no pre-LayerNorm, `post_layernorm` = timm's final `norm`,
CLS pooling), our text tower the BERT (`tower_conversion`'s rules), `text_projection` the MLP
(`text_projection_hidden_size`), `visual_projection` the head, `logit_scale` the temperature.

How the converted model equals the source at initialisation (no boxes, float32, 1e-5): the box-free image feature
is `visual_projection(whole_image - box_free_center) + tanh(pool_gate) * proposal_pool`. The converter sets
`proposal_window_sizes=[]`, so the whole-image term is the tower's CLS token after the final norm, exactly the
source's pooled feature, and `visual_projection` is its head; `box_free_center` starts at zero and moves only in
training mode (its EMA, whose momentum the converter sets to 0, so it stays zero); `region_pool_gate_init=0` makes `tanh(pool_gate)` exactly 0,
so the gated proposal term (the processor's proposals, read as regions) adds nothing until training opens the gate.
The caption embedding is the BERT tower's CLS token through the same MLP. `get_image_features` /
`get_text_features` give the unnormalised embeddings (open_clip's `encode_image` / `encode_text` with
`normalize=False`); `forward`'s `image_embeds` / `text_embeds` are the L2-normalised ones and its logits use the
copied `logit_scale`, as open_clip's `forward`.

Sizes come from the weights (widths, layers, MLP widths, patch size, vocabulary, positions, projection widths) and
from `open_clip_config.json` (`image_size`, `embed_dim`, `context_length`). Attention heads cannot be read from
weights: a tower config's `heads` when given, else its width / `head_width` (open_clip's field, default 64: 12 heads
for ViT-B/16 and PubMedBERT-base, as BiomedCLIP's).
"""

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from regionmed_clip.modeling_regionmed_clip import (
    RegionMedCLIPConfig,
    RegionMedCLIPModel,
    RegionMedCLIPTextConfig,
    RegionMedCLIPVisionConfig,
)
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, load_tokenizer
from regionmed_clip.processing.tokenization_regionmed_clip import TOKENIZER_FILES

from .conversion import EQUAL_AT_CONVERSION, Conversion, load_state_dict, rename_weights
from .tower_conversion import BERT_RULES

__all__ = ["OPEN_CLIP_CONFIG", "WEIGHT_FILES", "convert_biomedclip"]

OPEN_CLIP_CONFIG = "open_clip_config.json"
# The weight files open_clip writes, in order of preference (safetensors first: a pickle is read tensors-only).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip's defaults when `preprocess_cfg` does not say (OpenAI CLIP's mean and std, bicubic, shortest side).
_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_HEAD_WIDTH = 64  # open_clip's `head_width` default; ViT-B and BERT-base heads are 64 wide

_LAYER = r"visual\.trunk\.blocks\.(\d+)\."
_TOWER = "vision_model.encoder.layers.\\1."
# source key (fullmatch) -> our RegionMedCLIPModel key; `qkv` targets are split into q, k, v below.
_VISION_RULES = [
    (r"visual\.trunk\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual\.trunk\.pos_embed", "vision_model.embeddings.position_embedding.weight"),
    (r"visual\.trunk\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (_LAYER + r"norm1\.(weight|bias)", _TOWER + r"layer_norm1.\2"),
    (_LAYER + r"attn\.qkv\.(weight|bias)", _TOWER + r"self_attn.qkv.\2"),
    (_LAYER + r"attn\.proj\.(weight|bias)", _TOWER + r"self_attn.out_proj.\2"),
    (_LAYER + r"norm2\.(weight|bias)", _TOWER + r"layer_norm2.\2"),
    (_LAYER + r"mlp\.fc1\.(weight|bias)", _TOWER + r"mlp.fc1.\2"),
    (_LAYER + r"mlp\.fc2\.(weight|bias)", _TOWER + r"mlp.fc2.\2"),
    (r"visual\.trunk\.norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"visual\.head\.proj\.weight", "visual_projection.weight"),
]
_TEXT_RULES = [(r"text\.transformer\." + pattern, "text_model." + target) for pattern, target in BERT_RULES] + [
    (r"text\.proj\.(0|2)\.weight", r"text_projection.\1.weight"),  # hf_proj_type "mlp"
    (r"text\.proj\.weight", "text_projection.weight"),  # hf_proj_type "linear"
    (r"logit_scale", "logit_scale"),
]
_DROP_RULES = [
    (r"text\.transformer\.pooler\.dense\.(weight|bias)",
     "BERT's pooler (dense + tanh): open_clip's cls_last_hidden_state_pooler pools the last hidden state's CLS token "
     "and never reads it"),
    (r"text\.transformer\.embeddings\.(position_ids|token_type_ids)", "a constant index buffer, rebuilt by the model"),
]


def convert_biomedclip(source_dir: Path, *, tokenizer: Path | None = None) -> Conversion:
    """The RegionMed-CLIP model and processor of the open_clip checkpoint in `source_dir`, equal to it with no boxes
    (module docstring), and the account of every source weight. `tokenizer`: a folder with tokenizer files, used when
    `source_dir` holds none (BiomedCLIP's names its tokenizer by Hub id only). ValueError for a checkpoint or config
    this converter does not know, naming what it cannot map."""
    source_dir = Path(source_dir)
    model_cfg, preprocess_cfg = _read_config(source_dir)
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    state = load_state_dict(_weight_file(source_dir))
    mapped, used, dropped = _map_keys(state)

    tokenizer_dir = _tokenizer_dir(source_dir, tokenizer, text_cfg)
    context_length = int(text_cfg.get("context_length", 77))
    text_tokenizer = load_tokenizer(tokenizer_dir, model_max_length=context_length)
    text_tokenizer.model_max_length = context_length  # open_clip truncates at the context length, whatever the folder says
    text_tokenizer.init_kwargs["model_max_length"] = context_length

    vision_config = _vision_config(mapped, vision_cfg)
    text_config = _text_config(mapped, text_cfg, text_tokenizer, context_length)
    embed_dim = int(model_cfg["embed_dim"])
    projection_hidden = _text_projection_hidden_size(mapped, text_cfg, text_config.hidden_size, embed_dim)
    if mapped["visual_projection.weight"].shape != (embed_dim, vision_config.hidden_size):
        raise ValueError(f"visual.head.proj.weight has shape {tuple(mapped['visual_projection.weight'].shape)}, "
                         f"expected (embed_dim={embed_dim}, width={vision_config.hidden_size})")
    logit_scale = mapped["logit_scale"].reshape(1).float()
    config = RegionMedCLIPConfig(
        vision_config=vision_config, text_config=text_config, projection_dim=embed_dim,
        text_projection_hidden_size=projection_hidden,
        # CLIP's clamp: a trained temperature sits at log(100), which float32 rounds a hair above it.
        logit_scale_init_value=min(float(logit_scale), math.log(100.0)),
        roi_fusion_heads=vision_config.num_attention_heads,
        **EQUAL_AT_CONVERSION,
    )
    model = RegionMedCLIPModel(config)
    for prefix, module in (("vision_model.", model.vision_model), ("text_model.", model.text_model),
                           ("visual_projection.", model.visual_projection), ("text_projection.", model.text_projection)):
        module.load_state_dict({key[len(prefix):]: value for key, value in mapped.items() if key.startswith(prefix)},
                               strict=True)
    with torch.no_grad():
        model.logit_scale.copy_(logit_scale)
        model.box_free_center.zero_()
    model.eval()
    processor = RegionMedCLIPProcessor(_image_processor(vision_config.image_size, preprocess_cfg, config),
                                       text_tokenizer)
    return Conversion("biomedclip", model, processor, used, dropped)


def _read_config(source_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    path = source_dir / OPEN_CLIP_CONFIG
    if not path.is_file():
        raise ValueError(f"{str(source_dir)!r} holds no {OPEN_CLIP_CONFIG}: --from biomedclip reads an open_clip "
                         "folder (open_clip_config.json and open_clip_pytorch_model.bin or .safetensors)")
    config = json.loads(path.read_text())
    model_cfg = config.get("model_cfg", {})
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_cfg]
    if missing:
        raise ValueError(f"{str(path)!r}: model_cfg lacks {missing}")
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    name = vision_cfg.get("timm_model_name")
    if not name or not str(name).startswith("vit_"):
        raise ValueError(f"{str(path)!r}: vision_cfg.timm_model_name must name a timm ViT (vit_*), got {name!r}; "
                         "only open_clip's timm ViT image towers are converted")
    unsupported = {
        "vision_cfg.timm_pool": (vision_cfg.get("timm_pool", ""), ("", "token")),
        "vision_cfg.timm_proj": (vision_cfg.get("timm_proj", "linear"), ("linear",)),
        "vision_cfg.timm_proj_bias": (vision_cfg.get("timm_proj_bias", False), (False,)),
        "text_cfg.hf_pooler_type": (text_cfg.get("hf_pooler_type"), ("cls_last_hidden_state_pooler",)),
        "text_cfg.hf_proj_type": (text_cfg.get("hf_proj_type", "mlp"), ("mlp", "linear")),
        "text_cfg.hf_proj_bias": (text_cfg.get("hf_proj_bias", False), (False,)),
        "preprocess_cfg.resize_mode": (config.get("preprocess_cfg", {}).get("resize_mode", "shortest"), ("shortest",)),
        "preprocess_cfg.interpolation": (config.get("preprocess_cfg", {}).get("interpolation", "bicubic"),
                                         tuple(_RESAMPLE)),
    }
    for field, (value, supported) in unsupported.items():
        if value not in supported:
            raise ValueError(f"{str(path)!r}: {field} is {value!r}; the converter supports {list(supported)} "
                             "(BiomedCLIP's layout: CLS pooling, linear image head, MLP or linear text projection)")
    return model_cfg, config.get("preprocess_cfg", {})


def _weight_file(source_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (source_dir / name).is_file():
            return source_dir / name
    raise ValueError(f"{str(source_dir)!r} holds none of {list(WEIGHT_FILES)}")


def _map_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Our model's keys -> tensors, the source keys used, and those dropped with why; ValueError naming every
    source key no rule places."""
    renamed, used, dropped = rename_weights(
        state, _VISION_RULES + _TEXT_RULES, _DROP_RULES,
        "--from biomedclip (BiomedCLIP's open_clip layout: timm ViT visual.trunk.* / visual.head.proj, HF BERT "
        "text.transformer.*, text.proj, logit_scale)")
    mapped: dict[str, torch.Tensor] = {}
    for target, tensor in renamed.items():
        _place(mapped, target, tensor)
    return mapped, used, dropped


def _place(mapped: dict[str, torch.Tensor], target: str, tensor: torch.Tensor) -> None:
    """Store `tensor` under our key `target`, reshaped to our layout (timm's fused qkv split into q, k, v)."""
    tensor = tensor.float()
    if ".self_attn.qkv." in target:
        for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
            mapped[target.replace("qkv", name)] = part.contiguous()
    elif target == "vision_model.embeddings.class_embedding":
        mapped[target] = tensor.reshape(-1)  # timm (1, 1, C)
    elif target == "vision_model.embeddings.position_embedding.weight":
        mapped[target] = tensor.reshape(-1, tensor.shape[-1])  # timm (1, 1 + P, C)
    else:
        mapped[target] = tensor


def _layer_count(mapped: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(match.group(1)) for key in mapped if (match := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    if indices != set(range(len(indices))):
        raise ValueError(f"the checkpoint's layers {sorted(indices)} are not numbered 0..N-1")
    return len(indices)


def _heads(tower_cfg: dict[str, Any], width: int, where: str) -> int:
    if "heads" in tower_cfg:
        heads = int(tower_cfg["heads"])
    else:
        head_width = int(tower_cfg.get("head_width", _HEAD_WIDTH))
        if width % head_width:
            raise ValueError(f"{where}: width {width} is not a multiple of head_width {head_width}; give "
                             f"{where}.heads in {OPEN_CLIP_CONFIG}")
        heads = width // head_width
    if heads <= 0 or width % heads:
        raise ValueError(f"{where}: width {width} is not divisible into {heads} heads")
    return heads


def _vision_config(mapped: dict[str, torch.Tensor], vision_cfg: dict[str, Any]) -> RegionMedCLIPVisionConfig:
    patch_weight = mapped["vision_model.embeddings.patch_embedding.weight"]  # (C, channels, p, p)
    hidden, channels, patch_h, patch_w = patch_weight.shape
    if patch_h != patch_w:
        raise ValueError(f"non-square patches {patch_h}x{patch_w} are not supported")
    image_size = vision_cfg.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ValueError(f"vision_cfg.image_size {image_size} is not square; the tower takes square views")
        image_size = image_size[0]
    image_size = int(image_size)
    positions = mapped["vision_model.embeddings.position_embedding.weight"].shape[0]
    if image_size % patch_h or (image_size // patch_h) ** 2 + 1 != positions:
        raise ValueError(f"visual.trunk.pos_embed has {positions} positions, but image_size {image_size} with "
                         f"patch {patch_h} needs {(image_size // patch_h) ** 2 + 1} (one CLS + the patch grid)")
    return RegionMedCLIPVisionConfig(
        image_size=image_size, patch_size=patch_h, num_channels=channels, hidden_size=hidden,
        num_hidden_layers=_layer_count(mapped, "vision_model.encoder.layers."),
        num_attention_heads=_heads(vision_cfg, hidden, "vision_cfg"),
        intermediate_size=mapped["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        hidden_act="gelu", layer_norm_eps=1e-6,  # timm ViT: exact GELU, LayerNorm eps 1e-6
        pre_layernorm=False,  # timm ViT's norm_pre is Identity (no weights)
        pooling="cls",
    )


def _text_config(mapped: dict[str, torch.Tensor], text_cfg: dict[str, Any], tokenizer: Any,
                 context_length: int) -> RegionMedCLIPTextConfig:
    vocab_size, hidden = mapped["text_model.embeddings.word_embeddings.weight"].shape
    max_positions = mapped["text_model.embeddings.position_embeddings.weight"].shape[0]
    if context_length > max_positions:
        raise ValueError(f"text_cfg.context_length {context_length} exceeds the BERT's {max_positions} positions")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's vocabulary {vocab_size}: "
                         "it is not this checkpoint's tokenizer")
    return RegionMedCLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden,
        num_hidden_layers=_layer_count(mapped, "text_model.encoder.layers."),
        num_attention_heads=_heads(text_cfg, hidden, "text_cfg"),
        intermediate_size=mapped["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        hidden_act="gelu", layer_norm_eps=1e-12,  # BERT's
        max_position_embeddings=max_positions,
        type_vocab_size=mapped["text_model.embeddings.token_type_embeddings.weight"].shape[0],
        pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        pooling="cls",  # cls_last_hidden_state_pooler
    )


def _text_projection_hidden_size(mapped: dict[str, torch.Tensor], text_cfg: dict[str, Any], hidden: int,
                                 embed_dim: int) -> int | None:
    """None for a linear projection, the MLP's hidden width for open_clip's "mlp" (BiomedCLIP: 640)."""
    if text_cfg.get("hf_proj_type", "mlp") == "linear":
        if "text_projection.weight" not in mapped:
            raise ValueError("text_cfg.hf_proj_type is 'linear' but the checkpoint has no text.proj.weight")
        return None
    if "text_projection.0.weight" not in mapped or "text_projection.2.weight" not in mapped:
        raise ValueError("text_cfg.hf_proj_type is 'mlp' but the checkpoint lacks text.proj.0.weight / text.proj.2.weight")
    first, second = mapped["text_projection.0.weight"], mapped["text_projection.2.weight"]
    if first.shape[1] != hidden or second.shape != (embed_dim, first.shape[0]):
        raise ValueError(f"text.proj.0.weight {tuple(first.shape)} and text.proj.2.weight {tuple(second.shape)} do not "
                         f"map width {hidden} to embed_dim {embed_dim}")
    return first.shape[0]


def _tokenizer_dir(source_dir: Path, tokenizer: Path | None, text_cfg: dict[str, Any]) -> Path:
    if any((source_dir / name).is_file() for name in TOKENIZER_FILES):
        return source_dir
    if tokenizer is not None:
        if not any((Path(tokenizer) / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"the tokenizer folder {str(tokenizer)!r} holds none of {list(TOKENIZER_FILES)}")
        return Path(tokenizer)
    hub_id = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    raise ValueError(f"{str(source_dir)!r} holds no tokenizer files ({' or '.join(TOKENIZER_FILES)}): its "
                     f"{OPEN_CLIP_CONFIG} names the tokenizer by Hub id {hub_id!r} only. Put that tokenizer's files "
                     "(vocab.txt, tokenizer_config.json, ...) in a folder and pass it: --tokenizer DIR "
                     "(convert_biomedclip(..., tokenizer=DIR))")


def _image_processor(image_size: int, preprocess_cfg: dict[str, Any],
                     config: RegionMedCLIPConfig) -> RegionMedCLIPImageProcessor:
    """open_clip's eval transform: resize the shorter side to `image_size` (bicubic), centre crop, mean / std."""
    return RegionMedCLIPImageProcessor(
        image_size=image_size, roi_size=config.roi_image_size, max_rois=config.max_rois, resize_mode="center_crop",
        resample=_RESAMPLE[preprocess_cfg.get("interpolation", "bicubic")],
        image_mean=preprocess_cfg.get("mean", _DEFAULT_MEAN), image_std=preprocess_cfg.get("std", _DEFAULT_STD))
