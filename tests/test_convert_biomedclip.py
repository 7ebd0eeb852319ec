"""`regionmed-convert --from biomedclip` (training_scripts/convert_biomedclip.py) on a tiny checkpoint with
BiomedCLIP's exact open_clip key names and shape relations, against a reference forward written here from
the published layouts (timm's VisionTransformer, open_clip's HFTextEncoder), not from the converter: open_clip
and timm do not import here."""

import json
import os

import pytest
import torch
from conversion_helpers import reload_in_fresh_process
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F
from transformers import BertConfig, BertModel

from regionmed_clip.modeling_regionmed_clip import (
    RegionMedCLIPConfig,
    RegionMedCLIPModel,
    RegionMedCLIPTextModelWithProjection,
)
from regionmed_clip.training_scripts.conversion import save_conversion
from regionmed_clip.training_scripts.convert_biomedclip import convert_biomedclip

# A BiomedCLIP-shaped model at tiny widths: ViT (width 32, 2 blocks, 4 heads, patch 8, 32 px), BERT (width 32,
# 2 layers, 4 heads), open_clip's MLP text projection 32 -> 24 -> 16 (BiomedCLIP: 768 -> 640 -> 512).
WIDTH, LAYERS, HEADS, PATCH, IMAGE, MLP = 32, 2, 4, 8, 32, 128
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, TEXT_MLP, POSITIONS = 32, 2, 4, 64, 260
PROJ_HIDDEN, EMBED, CONTEXT = 24, 16, 256
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
WORDS = ["the", "a", "chest", "x", "ray", "shows", "no", "acute", "finding", "left", "right", "lower", "lobe",
         "pneumonia", "effusion", "pleural", "cardiomegaly", "mild", "severe", "opacity", "consolidation", "normal",
         "heart", "size", "lung", "##s", "##ed", "##al", "of", "in", "with", "and", "is", "are", "mass", "nodule",
         "fracture", "rib", "edema", "atelectasis", "base", "bilateral", "small", "large", "ct", "mri", "brain",
         "lesion", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]  # PubMedBERT's special-token ids
VOCAB_SIZE = len(VOCAB) + 6  # a checkpoint vocabulary may be larger than the tokenizer's
CAPTIONS = ["chest x ray shows left lower lobe pneumonia", "no acute finding", "mild cardiomegaly with small effusion"]


def _bert() -> BertModel:
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, num_hidden_layers=TEXT_LAYERS,
                                num_attention_heads=TEXT_HEADS, intermediate_size=TEXT_MLP,
                                max_position_embeddings=POSITIONS, pad_token_id=0), add_pooling_layer=True)
    with torch.no_grad():  # larger than BERT's init, so that a wrong mapping shows far above 1e-5
        for name, parameter in bert.named_parameters():
            parameter.copy_(1 + 0.1 * torch.randn_like(parameter) if "LayerNorm.weight" in name
                            else 0.2 * torch.randn_like(parameter))
    return bert.eval()


def source_state_dict() -> dict[str, torch.Tensor]:
    """The open_clip state dict of a BiomedCLIP-shaped CustomTextCLIP (TimmModel + HFTextEncoder)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=generator)

    grid = (IMAGE // PATCH) ** 2
    state = {
        "visual.trunk.cls_token": randn(1, 1, WIDTH),
        "visual.trunk.pos_embed": randn(1, 1 + grid, WIDTH),
        "visual.trunk.patch_embed.proj.weight": randn(WIDTH, 3, PATCH, PATCH),
        "visual.trunk.patch_embed.proj.bias": randn(WIDTH),
    }
    for index in range(LAYERS):
        block = f"visual.trunk.blocks.{index}."
        state |= {
            block + "norm1.weight": 1 + randn(WIDTH, scale=0.1), block + "norm1.bias": randn(WIDTH),
            block + "attn.qkv.weight": randn(3 * WIDTH, WIDTH), block + "attn.qkv.bias": randn(3 * WIDTH),
            block + "attn.proj.weight": randn(WIDTH, WIDTH), block + "attn.proj.bias": randn(WIDTH),
            block + "norm2.weight": 1 + randn(WIDTH, scale=0.1), block + "norm2.bias": randn(WIDTH),
            block + "mlp.fc1.weight": randn(MLP, WIDTH), block + "mlp.fc1.bias": randn(MLP),
            block + "mlp.fc2.weight": randn(WIDTH, MLP), block + "mlp.fc2.bias": randn(WIDTH),
        }
    state |= {
        "visual.trunk.norm.weight": 1 + randn(WIDTH, scale=0.1), "visual.trunk.norm.bias": randn(WIDTH),
        "visual.head.proj.weight": randn(EMBED, WIDTH),
    }
    bert_state = _bert().state_dict()
    bert_state.setdefault("embeddings.position_ids", torch.arange(POSITIONS)[None])  # older transformers saved it
    state |= {f"text.transformer.{key}": value for key, value in bert_state.items()}
    state |= {
        "text.proj.0.weight": randn(PROJ_HIDDEN, TEXT_WIDTH),
        "text.proj.2.weight": randn(EMBED, PROJ_HIDDEN),
        "logit_scale": torch.tensor(4.0),
    }
    return state


def open_clip_config() -> dict:
    return {
        "model_cfg": {
            "embed_dim": EMBED,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": IMAGE, "head_width": WIDTH // HEADS},
            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": CONTEXT, "heads": TEXT_HEADS},
        },
        "preprocess_cfg": {"mean": MEAN, "std": STD},
    }


def write_source(folder, state=None, *, bin_file=True, safetensors=False, vocab=True):
    folder.mkdir(parents=True, exist_ok=True)
    state = source_state_dict() if state is None else state
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config()))
    if bin_file:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    if safetensors:
        save_file({key: value.contiguous() for key, value in state.items()},
                  str(folder / "open_clip_pytorch_model.safetensors"))
    if vocab:
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


# -- the reference: open_clip's CustomTextCLIP from its published layout ------------------------------------------

def reference_image_features(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer (class token, no pre-norm, pre-norm blocks with fused qkv, final norm, token
    pooling) and open_clip's TimmModel head (`head.proj`, Linear without bias); unnormalised."""
    def norm(x, name):
        return F.layer_norm(x, (WIDTH,), state[name + ".weight"], state[name + ".bias"], eps=1e-6)

    x = F.conv2d(pixels, state["visual.trunk.patch_embed.proj.weight"], state["visual.trunk.patch_embed.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    batch = x.shape[0]
    x = torch.cat([state["visual.trunk.cls_token"].expand(batch, -1, -1), x], dim=1) + state["visual.trunk.pos_embed"]
    tokens, head_dim = x.shape[1], WIDTH // HEADS
    for index in range(LAYERS):
        block = f"visual.trunk.blocks.{index}."
        qkv = F.linear(norm(x, block + "norm1"), state[block + "attn.qkv.weight"], state[block + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attention = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        attended = (attention @ v).transpose(1, 2).reshape(batch, tokens, WIDTH)
        x = x + F.linear(attended, state[block + "attn.proj.weight"], state[block + "attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(x, block + "norm2"), state[block + "mlp.fc1.weight"], state[block + "mlp.fc1.bias"]))
        x = x + F.linear(hidden, state[block + "mlp.fc2.weight"], state[block + "mlp.fc2.bias"])
    pooled = norm(x, "visual.trunk.norm")[:, 0]
    return F.linear(pooled, state["visual.head.proj.weight"])


def reference_text_features(state: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """open_clip's HFTextEncoder: a transformers BertModel with the `text.transformer.*` weights, attention mask
    `ids != pad`, the CLS token of the last hidden state, MLP projection (Linear, GELU, Linear; no biases)."""
    bert = _bert()
    bert.load_state_dict({key.removeprefix("text.transformer."): value for key, value in state.items()
                          if key.startswith("text.transformer.") and not key.endswith("position_ids")})
    with torch.no_grad():
        hidden = bert(input_ids=input_ids, attention_mask=(input_ids != 0).long()).last_hidden_state[:, 0]
    return F.linear(F.gelu(F.linear(hidden, state["text.proj.0.weight"])), state["text.proj.2.weight"])


def open_clip_token_ids(texts: list[str]) -> torch.Tensor:
    """open_clip's HFTokenizer: the WordPiece tokenizer padded to the context length."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab_file=None, vocab={token: index for index, token in enumerate(VOCAB)},
                              do_lower_case=True)
    return tokenizer(texts, return_tensors="pt", max_length=CONTEXT, padding="max_length", truncation=True).input_ids


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    source = write_source(tmp_path_factory.mktemp("biomedclip"))
    return source, convert_biomedclip(source)


# -- tests ------------------------------------------------------------------------------------------------------

def test_image_and_text_embeddings_equal_the_source(converted):
    source, conversion = converted
    state = torch.load(source / "open_clip_pytorch_model.bin", weights_only=True)
    model, processor = conversion.model, conversion.processor
    assert not model.training
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    ids = torch.randint(5, len(VOCAB), (3, 20))
    ids[:, 0], ids[1, 12:], ids[2, 7:] = 2, 0, 0  # [CLS] first, padding tails
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
        expected_image, expected_text = reference_image_features(state, pixels), reference_text_features(state, ids)
        # the processor's own pixels, with its box-free proposals: their pooled term is gated at exactly 0
        film = Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy())
        inputs = processor(images=[film], return_tensors="pt")
        processed = model.get_image_features(**inputs).pooler_output
        expected_processed = reference_image_features(state, inputs["pixel_values"])
        # the processor's captions: open_clip's ids (padded to 256) give the same CLS embedding
        caption_inputs = processor(text=CAPTIONS, return_tensors="pt")
        captions = model.get_text_features(**caption_inputs).pooler_output
        expected_captions = reference_text_features(state, open_clip_token_ids(CAPTIONS))
        output = model(pixel_values=pixels[:1], input_ids=caption_inputs["input_ids"],
                       attention_mask=caption_inputs["attention_mask"])
    assert "proposal_pixel_values" in inputs  # the gated proposal term is on the path and adds 0
    assert expected_image.abs().max() > 0.1 and expected_text.abs().max() > 0.1  # not a trivially small output
    assert _max_diff(image, expected_image) < 1e-5
    assert _max_diff(text, expected_text) < 1e-5
    assert _max_diff(processed, expected_processed) < 1e-5
    assert _max_diff(captions, expected_captions) < 1e-5
    ids_open_clip = open_clip_token_ids(CAPTIONS)
    length = caption_inputs["input_ids"].shape[1]
    assert torch.equal(caption_inputs["input_ids"], ids_open_clip[:, :length])
    assert not ids_open_clip[:, length:].any()
    # forward's embeddings are the normalised ones, scaled by the source's temperature (open_clip's forward)
    assert _max_diff(output.image_embeds, F.normalize(expected_image[:1], dim=-1)) < 1e-5
    assert _max_diff(output.text_embeds, F.normalize(expected_captions, dim=-1)) < 1e-5
    assert abs(output.logit_scale.item() - torch.tensor(4.0).exp().item()) < 1e-4


def test_model_and_processor_settings(converted):
    _, conversion = converted
    config, processor = conversion.model.config, conversion.processor
    assert config.projection_dim == EMBED and config.text_projection_hidden_size == PROJ_HIDDEN
    assert config.proposal_window_sizes == [] and config.region_pool_gate_init == 0.0
    assert (config.vision_config.num_attention_heads, config.text_config.num_attention_heads) == (HEADS, TEXT_HEADS)
    assert (config.vision_config.patch_size, config.vision_config.image_size) == (PATCH, IMAGE)
    assert config.vision_config.intermediate_size == MLP and config.text_config.vocab_size == VOCAB_SIZE
    assert not conversion.model.box_free_center.any()
    keys = set(conversion.model.state_dict())
    assert {"text_projection.0.weight", "text_projection.2.weight"} <= keys and "text_projection.weight" not in keys
    image_processor = processor.image_processor
    assert (image_processor.image_size, image_processor.resize_mode) == (IMAGE, "center_crop")
    assert image_processor.resample == int(Image.Resampling.BICUBIC)
    assert image_processor.image_mean == MEAN and image_processor.image_std == STD
    assert processor.tokenizer.model_max_length == CONTEXT
    assert processor(text=["chest " * 400], return_tensors="pt")["input_ids"].shape[1] == CONTEXT


def test_every_source_weight_is_used_or_dropped_with_a_reason(converted):
    source, conversion = converted
    state = torch.load(source / "open_clip_pytorch_model.bin", weights_only=True)
    assert set(conversion.used) | set(conversion.dropped) == set(state)
    assert not set(conversion.used) & set(conversion.dropped)
    assert set(conversion.dropped) == {"text.transformer.pooler.dense.weight", "text.transformer.pooler.dense.bias",
                                       "text.transformer.embeddings.position_ids"}
    assert all(reason for reason in conversion.dropped.values())


def test_the_proposal_term_is_gated_and_opens_in_training(converted):
    _, conversion = converted
    model, processor = conversion.model, conversion.processor
    film = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    inputs = processor(images=[film], return_tensors="pt")
    with torch.no_grad():
        closed = model.get_image_features(**inputs).pooler_output
        model.roi_processor.pool_gate.fill_(0.5)
        opened = model.get_image_features(**inputs).pooler_output
        model.roi_processor.pool_gate.fill_(0.0)
    assert model.roi_processor.pool_gate.requires_grad
    assert _max_diff(opened, closed) > 1e-3  # a live term, closed only by its gate


def test_safetensors_preferred_and_bin_read_with_weights_only(tmp_path):
    marker = tmp_path / "pickle_ran"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    source = write_source(tmp_path / "both", bin_file=False, safetensors=True)
    torch.save({"visual.trunk.cls_token": Payload()}, source / "open_clip_pytorch_model.bin")
    conversion = convert_biomedclip(source)  # the safetensors file, never the pickle
    assert conversion.model.config.projection_dim == EMBED and not marker.exists()

    (source / "open_clip_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_biomedclip(source)
    assert not marker.exists()


def test_safetensors_only_checkpoint_converts_the_same(converted, tmp_path):
    _, from_bin = converted
    source = write_source(tmp_path / "st", bin_file=False, safetensors=True)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert _max_diff(convert_biomedclip(source).model.get_image_features(pixel_values=pixels).pooler_output,
                         from_bin.model.get_image_features(pixel_values=pixels).pooler_output) == 0


def test_an_unknown_key_is_an_error_naming_it(tmp_path):
    state = source_state_dict()
    state["visual.trunk.fc_norm.weight"] = torch.ones(WIDTH)
    state["text.transformer.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.ones(3, TEXT_WIDTH)
    source = write_source(tmp_path / "src", state)
    with pytest.raises(ValueError, match="cannot map 2 checkpoint weight") as error:
        convert_biomedclip(source)
    assert "visual.trunk.fc_norm.weight" in str(error.value)
    assert "distance_embedding.weight" in str(error.value)


def test_a_missing_tokenizer_is_a_clear_error(tmp_path):
    source = write_source(tmp_path / "src", vocab=False)
    with pytest.raises(ValueError, match="no tokenizer files") as error:
        convert_biomedclip(source)
    assert "--tokenizer DIR" in str(error.value)
    assert "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract" in str(error.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds none of"):
        convert_biomedclip(source, tokenizer=empty)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    conversion = convert_biomedclip(source, tokenizer=tokenizer_dir)
    assert conversion.processor.tokenizer.convert_tokens_to_ids("pneumonia") == VOCAB.index("pneumonia")


def test_default_text_projection_is_unchanged():
    config = RegionMedCLIPConfig.from_preset("tiny")
    assert config.text_projection_hidden_size is None and config.text_config.projection_hidden_size is None
    keys = set(RegionMedCLIPModel(config).state_dict())
    assert "text_projection.weight" in keys and not any(key.startswith("text_projection.0") for key in keys)
    with pytest.raises(Exception, match="text_projection_hidden_size"):
        RegionMedCLIPConfig.from_preset("tiny", text_projection_hidden_size=0)


def test_saved_conversion_reloads_in_a_fresh_offline_process(converted, tmp_path):
    source, conversion = converted
    state = torch.load(source / "open_clip_pytorch_model.bin", weights_only=True)
    output = tmp_path / "converted"
    report = save_conversion(conversion, output, source)
    assert report["source"] == "biomedclip" and report["weights_used"] == len(conversion.used)
    saved_config = json.loads((output / "config.json").read_text())
    assert saved_config["text_projection_hidden_size"] == PROJ_HIDDEN
    assert saved_config["text_config"]["projection_hidden_size"] == PROJ_HIDDEN

    film = torch.randint(0, 256, (36, 40, 3), dtype=torch.uint8)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    reloaded = reload_in_fresh_process(output, tmp_path, film, CAPTIONS, pixels)

    processor = conversion.processor
    with torch.no_grad():
        processed = processor(images=[Image.fromarray(film.numpy())], return_tensors="pt")["pixel_values"]
        expected_image = reference_image_features(state, processed)
        expected_text = reference_text_features(state, open_clip_token_ids(CAPTIONS))
        expected_pixels = reference_image_features(state, pixels)
    assert reloaded["max_length"] == CONTEXT
    # the text tower alone, from the same folder, carries the MLP projection
    text_only = RegionMedCLIPTextModelWithProjection.from_pretrained(output).eval()
    with torch.no_grad():
        text_only_embeds = text_only(**processor(text=CAPTIONS, return_tensors="pt")).text_embeds
    assert _max_diff(text_only_embeds, expected_text) < 1e-5
    assert _max_diff(reloaded["image"], expected_image) < 1e-5
    assert _max_diff(reloaded["text"], expected_text) < 1e-5
    assert _max_diff(reloaded["pixels"], expected_pixels) < 1e-5
