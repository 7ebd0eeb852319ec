"""`regionmed-convert --from clip` (training_scripts/convert_clip.py) against transformers' own `CLIPModel`: a tiny
random CLIPModel saved with `save_pretrained`, a tiny CLIP BPE tokenizer written here (vocab.json + merges.txt)
and a CLIPImageProcessor config beside it. After conversion, with no boxes, the image and text embeddings
equal the source's to 1e-5 through both processors, and the token ids are CLIP's. Also the CLIP options of
the text tower (causal, pre-LN, eos pooling, ...) and that their defaults leave the BERT tower unchanged."""

import json

import numpy as np
import pytest
import torch
from conversion_helpers import reload_in_fresh_process
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPTextConfig, RegionMedCLIPTextModel
from regionmed_clip.modeling_regionmed_clip.configuration_regionmed_clip import CONFIG_ERRORS
from regionmed_clip.processing import load_tokenizer
from regionmed_clip.training_scripts.conversion import save_conversion
from regionmed_clip.training_scripts.convert_clip import convert_clip

IMAGE, PATCH, EMBED, POSITIONS = 32, 8, 24, 32
WORDS = ["no", "lung", "left", "right", "pleural", "effusion", "the", "chest", "is", "clear", "small", "large"]
CAPTIONS = ["no pleural effusion.", "a small LEFT pleural effusion is seen in the chest", "lung"]
# a caption longer than the tower's positions: the tokenizer truncates and keeps the end-of-text token
LONG = " ".join(["the chest is clear"] * 10)


def _write_bpe_tokenizer(folder) -> None:
    """CLIP's byte-level BPE layout at tiny size: every byte alone and word-final (`</w>`), merges that build
    `WORDS`, then <|startoftext|> and <|endoftext|> last (as in CLIP's 49408 tokens)."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols]
    merges = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in dict.fromkeys(merges)))


def make_source(folder, *, legacy_eos: bool = False, seed: int = 0) -> CLIPModel:
    """A tiny CLIPModel folder: weights, config, CLIP tokenizer and CLIPImageProcessor config. `legacy_eos`
    writes eos_token_id 2 into the text config (as OpenAI's original CLIP configs do), which makes
    transformers pool at the largest id instead of the first end-of-text token."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_bpe_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    eos = 2 if legacy_eos else tokenizer.eos_token_id
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 48, "max_position_embeddings": POSITIONS, "eos_token_id": eos,
                     "bos_token_id": tokenizer.bos_token_id, "pad_token_id": 1},
        vision_config={"image_size": IMAGE, "patch_size": PATCH, "hidden_size": 40, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "intermediate_size": 56},
        projection_dim=EMBED)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():  # larger than CLIP's init, so that a wrong mapping shows far above 1e-5
        for name, parameter in model.named_parameters():
            if name == "logit_scale":
                parameter.fill_(4.6052)  # CLIP's trained temperature, a hair above log(100)
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.2 * torch.randn_like(parameter))
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                          image_mean=[0.5, 0.45, 0.4], image_std=[0.25, 0.3, 0.28]).save_pretrained(folder)
    return model


def film(height: int, width: int, seed: int = 0) -> Image.Image:
    """A film-like grayscale image: a bright chest field, darker lungs, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    field = 200 - 80 * (((x - width * 0.3) / width) ** 2 + ((y - height * 0.5) / height) ** 2 < 0.05)
    field = field - 80 * (((x - width * 0.7) / width) ** 2 + ((y - height * 0.5) / height) ** 2 < 0.05)
    return Image.fromarray(np.clip(field + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8), "L")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    source = make_source(folder)
    return folder, source, convert_clip(folder)


# 64 x 64: square; 71 x 45: portrait, whose resize and crop round the same way in both processors.
@pytest.mark.parametrize("shape", [(64, 64), (71, 45)])
def test_box_free_image_embedding_equals_clip_through_both_processors(converted, shape):
    folder, source, conversion = converted
    image = film(*shape)
    ours = conversion.processor(images=[image])
    theirs = CLIPImageProcessorPil.from_pretrained(folder)(images=[image.convert("RGB")], return_tensors="pt")
    assert "proposal_pixel_values" in ours  # the processor's proposals are pooled, through the closed gate
    assert _max_diff(ours["pixel_values"], theirs["pixel_values"]) < 1e-5
    with torch.no_grad():
        expected = source.get_image_features(pixel_values=theirs["pixel_values"]).pooler_output
        features = conversion.model.get_image_features(**ours).pooler_output  # unnormalised, as CLIP's
        output = conversion.model(**ours)  # normalised embeddings
    assert _max_diff(features, expected) < 1e-5
    normalised = torch.nn.functional.normalize(expected, dim=-1)
    assert _max_diff(output.image_embeds, normalised) < 1e-5
    assert _max_diff(output.box_free_image_embeds, normalised) < 1e-5


@pytest.mark.parametrize("size", [(50, 70), (70, 50), (64, 64), (71, 45), (33, 100), (101, 64)])
def test_pixels_equal_clip_for_every_aspect_ratio(converted, size):
    # odd and even overhangs, both orientations: the long side floors and the crop starts at (resized - view) // 2
    folder, _, conversion = converted
    image = film(*size)
    ours = conversion.processor(images=[image])["pixel_values"]
    theirs = CLIPImageProcessorPil.from_pretrained(folder)(images=[image.convert("RGB")], return_tensors="pt")
    assert _max_diff(ours, theirs["pixel_values"]) < 1e-5


def test_text_embedding_and_token_ids_equal_clip(converted):
    folder, source, conversion = converted
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    captions = [*CAPTIONS, LONG]
    ours = conversion.processor(text=captions)
    theirs = tokenizer(captions, padding=True, truncation=True, max_length=POSITIONS, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["input_ids"].shape[1] == POSITIONS  # LONG was truncated to the tower's positions ...
    assert ours["input_ids"][-1, -1] == tokenizer.eos_token_id  # ... keeping its end-of-text token
    assert ours["input_ids"][0, 0] == tokenizer.bos_token_id and "token_type_ids" not in ours
    with torch.no_grad():
        expected = source.get_text_features(**theirs).pooler_output
        features = conversion.model.get_text_features(**ours).pooler_output
        output = conversion.model(**ours)  # captions packed by the model, padded with CLIP's pad token
    assert _max_diff(features, expected) < 1e-5
    assert _max_diff(output.text_embeds, torch.nn.functional.normalize(expected, dim=-1)) < 1e-5


def test_logits_equal_clip(converted):
    folder, source, conversion = converted
    inputs = conversion.processor(images=[film(64, 64), film(64, 64, seed=1)], text=CAPTIONS)
    with torch.no_grad():
        ours = conversion.model(**inputs)
        theirs = source(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        pixel_values=inputs["pixel_values"])
    assert _max_diff(ours.logits_per_image, theirs.logits_per_image) < 1e-3  # logits: x100 the cosines
    assert _max_diff(ours.logit_scale, theirs.logits_per_image.new_tensor(4.6052).exp().clamp(max=100)) < 1e-4


def test_legacy_eos_token_id_pools_at_the_largest_id(tmp_path):
    """OpenAI's CLIP configs say eos_token_id 2; transformers then pools at each row's largest id (the
    end-of-text token is the vocabulary's last), and so does the converted tower."""
    source = make_source(tmp_path / "legacy", legacy_eos=True, seed=3)
    conversion = convert_clip(tmp_path / "legacy")
    assert conversion.model.config.text_config.eos_token_id == 2
    inputs = conversion.processor(text=CAPTIONS)
    with torch.no_grad():
        expected = source.get_text_features(**inputs).pooler_output
        features = conversion.model.get_text_features(**inputs).pooler_output
    assert _max_diff(features, expected) < 1e-5


def test_every_source_weight_is_accounted_for_and_the_region_modules_start_closed(converted):
    folder, _, conversion = converted
    state = load_file(folder / "model.safetensors")
    assert sorted(conversion.used) == sorted(state) and conversion.dropped == {}
    config = conversion.model.config
    assert config.proposal_window_sizes == [] and config.box_free_center_momentum == 0
    assert torch.count_nonzero(conversion.model.box_free_center) == 0
    assert conversion.model.roi_processor.pool_gate.item() == 0
    processor = conversion.processor.image_processor
    assert (processor.image_size, processor.resize_mode, processor.image_mean) == (IMAGE, "center_crop", [0.5, 0.45, 0.4])
    assert processor.roi_size == config.roi_image_size and config.roi_image_size % PATCH == 0


def test_the_proposal_term_opens_in_training(converted):
    """The gate is closed, not dead: a training step's gradient reaches it through the proposal pool."""
    _, _, conversion = converted
    model = conversion.model
    inputs = conversion.processor(images=[film(64, 64)], text=CAPTIONS[:1])
    model.train()
    try:
        model.zero_grad()
        model(**inputs).logits_per_image.sum().backward()
        assert model.roi_processor.pool_gate.grad.abs().item() > 0
    finally:
        model.zero_grad()
        model.eval()


def test_pickled_checkpoint_with_index_buffers(tmp_path):
    """A pytorch_model.bin (read with weights_only=True) with the position_ids buffers older checkpoints saved:
    they are dropped with a reason."""
    folder = tmp_path / "bin"
    make_source(folder)
    state = load_file(folder / "model.safetensors")
    state["text_model.embeddings.position_ids"] = torch.arange(POSITIONS)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange((IMAGE // PATCH) ** 2 + 1)[None]
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    conversion = convert_clip(folder)
    assert set(conversion.dropped) == {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
    assert all("index buffer" in why for why in conversion.dropped.values())


def test_unknown_weight_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "extra"
    make_source(folder)
    state = load_file(folder / "model.safetensors")
    state["text_model.pooler.dense.weight"] = torch.zeros(2, 2)
    state["visual_head.bias"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"cannot map.*text_model\.pooler\.dense\.weight.*visual_head\.bias"):
        convert_clip(folder)


def test_not_a_clip_folder_is_an_error(tmp_path):
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'vit'.*CLIPModel"):
        convert_clip(folder)


def test_tokenizer_from_another_folder(tmp_path):
    folder, tokenizer_dir = tmp_path / "clip", tmp_path / "tokenizer"
    make_source(folder)
    tokenizer_dir.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).rename(tokenizer_dir / name)
    with pytest.raises(ValueError, match="--tokenizer DIR"):
        convert_clip(folder)
    conversion = convert_clip(folder, tokenizer=tokenizer_dir)
    expected = CLIPTokenizer.from_pretrained(tokenizer_dir)(CAPTIONS, padding=True)["input_ids"]
    assert conversion.processor(text=CAPTIONS)["input_ids"].tolist() == expected


def test_load_tokenizer_takes_a_bare_clip_bpe_folder_and_keeps_the_bert_rules(tmp_path):
    _write_bpe_tokenizer(tmp_path)  # vocab.json + merges.txt only: no tokenizer_config.json names the class
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, CLIPTokenizer) and tokenizer.cls_token is None
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # CLIP pads with its end-of-text token
    assert tokenizer("no lung")["input_ids"] == CLIPTokenizer.from_pretrained(tmp_path)("no lung")["input_ids"]
    assert tokenizer.model_max_length == 256
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer in.*vocab.json and merges.txt"):
        load_tokenizer(tmp_path / "empty")


def test_saved_conversion_reloads_in_a_fresh_offline_process(converted, tmp_path):
    folder, source, conversion = converted
    output = tmp_path / "converted"
    report = save_conversion(conversion, output, folder)
    assert report["source"] == "clip" and report["weights_used"] == len(conversion.used)
    saved = json.loads((output / "config.json").read_text())["text_config"]
    assert (saved["pooling"], saved["causal"], saved["norm_first"], saved["type_vocab_size"]) == ("eos", True, True, 0)

    image = film(64, 64, seed=5)
    reloaded = reload_in_fresh_process(output, tmp_path, torch.from_numpy(np.array(image)), CAPTIONS)

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    theirs = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=[image.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        expected_image = source.get_image_features(**pixels).pooler_output
        expected_text = source.get_text_features(**theirs).pooler_output
    assert reloaded["tokenizer"] == "CLIPTokenizer"
    assert reloaded["ids"].tolist() == theirs["input_ids"].tolist()
    assert _max_diff(reloaded["image"], expected_image) < 1e-5
    assert _max_diff(reloaded["text"], expected_text) < 1e-5


# -- the text tower's CLIP options ---------------------------------------------------------------------------

TINY_TEXT = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 32, "max_position_embeddings": 12}


def test_text_tower_defaults_keep_the_bert_layout():
    config = RegionMedCLIPTextConfig(**TINY_TEXT)
    assert (config.norm_first, config.causal, config.embedding_layer_norm, config.final_layer_norm) == (
        False, False, True, False)
    model = RegionMedCLIPTextModel(config)
    keys = set(model.state_dict())
    assert {"embeddings.LayerNorm.weight", "embeddings.token_type_embeddings.weight"} <= keys
    assert not any(key.startswith("final_layer_norm") for key in keys)
    assert model.embeddings.word_embeddings.padding_idx == config.pad_token_id
    assert not model.encoder.layers[0].norm_first and not model.encoder.layers[0].self_attn.is_causal


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_clip_options_change_the_layout(attn_implementation):
    config = RegionMedCLIPTextConfig(**TINY_TEXT, norm_first=True, causal=True, pooling="eos", eos_token_id=40,
                                     embedding_layer_norm=False, type_vocab_size=0, final_layer_norm=True,
                                     hidden_act="quick_gelu")
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = RegionMedCLIPTextModel(config).eval()
    keys = set(model.state_dict())
    assert "final_layer_norm.weight" in keys
    assert not any("LayerNorm" in key or "token_type" in key for key in keys)
    assert model.embeddings.word_embeddings.padding_idx is None  # CLIP pads with the token it pools
    # the first eos (id 40), not the largest id (45): ids above eos are tokens added after it
    ids = torch.tensor([[2, 45, 9, 40, 40], [2, 8, 40, 40, 40]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = model(ids, mask)
        # causal: a row's first eos sees only what precedes it, so later tokens (and no mask) change nothing
        changed = model(torch.tensor([[2, 45, 9, 40, 5], [2, 8, 40, 3, 4]]))
        bidirectional = RegionMedCLIPTextModel(RegionMedCLIPTextConfig(**{**config.to_diff_dict(), "causal": False,
                                                                           "pooling": "mean"}))
        bidirectional.load_state_dict(model.state_dict())
        unmasked = bidirectional.eval()(ids).last_hidden_state
    assert torch.equal(out.pooler_output, out.last_hidden_state[[0, 1], [3, 2]])
    assert _max_diff(out.pooler_output, changed.pooler_output) < 1e-5
    assert _max_diff(out.last_hidden_state[:, 0], unmasked[:, 0]) > 1e-3  # the causal mask was applied
    with pytest.raises(ValueError, match="no token types"):
        model(ids, mask, token_type_ids=torch.zeros_like(ids))


@pytest.mark.parametrize(("fields", "message"), [
    ({"pooling": "eos", "causal": True}, "needs eos_token_id"),
    ({"pooling": "eos", "eos_token_id": 3}, "needs causal=True"),
    ({"causal": True, "pooling": "cls"}, "pooling 'cls'"),
    ({"final_layer_norm": True}, "norm_first=True"),
    ({"hidden_act": "swooshy"}, "hidden_act"),
    ({"type_vocab_size": -1}, "type_vocab_size"),
    ({"pooling": "eos", "causal": True, "eos_token_id": 50}, "eos_token_id"),
])
def test_invalid_text_option_combinations_are_named(fields, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        RegionMedCLIPTextConfig(**{**TINY_TEXT, **fields})


def test_a_preset_model_refuses_a_tokenizer_without_cls(tmp_path):
    """The presets' BERT-style text tower pools at [CLS]: a CLIP tokenizer is named, with the way that works."""
    from regionmed_clip.data.synthetic import write_synthetic_dataset
    from regionmed_clip.training_scripts.train import build_trainer, parse_command, resolve_run_config

    (tmp_path / "clip_tokenizer").mkdir()
    _write_bpe_tokenizer(tmp_path / "clip_tokenizer")
    write_synthetic_dataset(tmp_path / "data", n=20, seed=0)
    run = resolve_run_config(*parse_command(["--preset", "tiny", "--data", str(tmp_path / "data"), "--output-dir",
                                             str(tmp_path / "out"), "--max-steps", "1", "--tokenizer",
                                             str(tmp_path / "clip_tokenizer")]))
    with pytest.raises(ValueError, match=r"no \[CLS\] token.*regionmed-convert --from clip"):
        build_trainer(run)
