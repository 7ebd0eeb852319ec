"""`model_from_vision_text_pretrained` and `regionmed-convert --from vit-bert`: start from local ViT / CLIP-vision and
BERT checkpoints."""

import json

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPVisionConfig,
    CLIPVisionModel,
    ViTConfig,
    ViTModel,
)

from regionmed_clip.training_scripts.conversion import CONVERSION_REPORT
from regionmed_clip.training_scripts.convert import main as convert_main
from regionmed_clip.training_scripts.tower_conversion import convert_vit_bert, model_from_vision_text_pretrained

VISION_SIZES = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 64}


@pytest.fixture
def bert_dir(tmp_path):
    torch.manual_seed(1)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=256)
    BertModel(config).eval().save_pretrained(tmp_path / "bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture(params=["vit", "clip_vision"])
def vision_checkpoint(request, tmp_path):
    torch.manual_seed(2)
    if request.param == "vit":
        model = ViTModel(ViTConfig(**VISION_SIZES), add_pooling_layer=True)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**VISION_SIZES))
    model.eval().save_pretrained(tmp_path / request.param)
    return tmp_path / request.param, model


def test_towers_are_copied_and_compute_the_same_functions(vision_checkpoint, bert_dir):
    vision_dir, vision_reference = vision_checkpoint
    model = model_from_vision_text_pretrained(vision_dir, bert_dir, projection_dim=16, max_rois=3,
                                                           roi_image_size=16, roi_fusion_heads=4).eval()
    assert model.config.projection_dim == 16 and model.config.max_rois == 3
    assert model.config.vision_config.pre_layernorm == isinstance(vision_reference, CLIPVisionModel)
    assert model.config.text_config.cls_token_id == 2

    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.vision_model(pixels)
        theirs = vision_reference(pixel_values=pixels)
    if isinstance(vision_reference, ViTModel):
        torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)
    else:  # CLIP normalises only the pooled CLS token
        torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=1e-5, atol=1e-5)

    bert = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
    ids = torch.randint(5, 120, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours_text = model.text_model(ids, mask).last_hidden_state
        theirs_text = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours_text[0], theirs_text[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_text[1, :7], theirs_text[1, :7], rtol=1e-5, atol=1e-5)
    assert torch.equal(model.text_model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)


def test_full_clip_checkpoint_uses_its_vision_tower(tmp_path, bert_dir):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    clip = CLIPModel(CLIPConfig(vision_config=VISION_SIZES, text_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                                         "num_attention_heads": 4, "intermediate_size": 64}))
    clip.eval().save_pretrained(tmp_path / "clip")
    model = model_from_vision_text_pretrained(tmp_path / "clip", bert_dir, roi_image_size=16, roi_fusion_heads=4)
    assert torch.equal(model.vision_model.embeddings.class_embedding, clip.vision_model.embeddings.class_embedding)


def test_unknown_config_fields_are_rejected(vision_checkpoint, bert_dir):
    with pytest.raises(ValueError, match="unknown config fields.*max_roi"):
        model_from_vision_text_pretrained(vision_checkpoint[0], bert_dir, max_roi=3)


def test_a_text_checkpoint_that_is_not_bert_is_rejected(vision_checkpoint):
    vision_dir = vision_checkpoint[0]
    with pytest.raises(ValueError, match="text_path must hold a BERT"):
        model_from_vision_text_pretrained(vision_dir, vision_dir, roi_image_size=16, roi_fusion_heads=4)


def test_vit_bert_conversion_accounts_for_every_weight_and_tokenizes_as_the_source(vision_checkpoint, bert_dir):
    vision_dir, vision_reference = vision_checkpoint
    conversion = convert_vit_bert(vision_dir, bert_dir)
    source_keys = {f"vision/{key}" for key in vision_reference.state_dict()}
    source_keys |= {f"text/{key}" for key in BertModel.from_pretrained(bert_dir, add_pooling_layer=False).state_dict()}
    assert set(conversion.used) | set(conversion.dropped) == source_keys
    assert not set(conversion.used) & set(conversion.dropped)
    assert all(why for why in conversion.dropped.values())
    if isinstance(vision_reference, ViTModel):  # its pooler is dropped, named
        assert any(key.startswith("vision/pooler.") for key in conversion.dropped)
    source_tokenizer = BertTokenizerFast.from_pretrained(bert_dir)
    text = ["w1 w2 w3", "w7"]
    ours = conversion.processor.tokenizer(text, padding="max_length", max_length=8)
    assert ours["input_ids"] == source_tokenizer(text, padding="max_length", max_length=8)["input_ids"]
    assert conversion.processor.image_processor.image_size == 32


def test_vit_bert_conversion_needs_a_tokenizer(vision_checkpoint, bert_dir):
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bert_dir / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no tokenizer files .* pass --tokenizer DIR"):
        convert_vit_bert(vision_checkpoint[0], bert_dir)


def test_regionmed_convert_writes_a_folder_automodel_loads(vision_checkpoint, bert_dir, tmp_path, capsys):
    from transformers import AutoModel, AutoProcessor

    vision_dir, _ = vision_checkpoint
    output = tmp_path / "converted"
    assert convert_main(["--from", "vit-bert", str(vision_dir), str(output), "--text-source", str(bert_dir)]) == 0
    report = json.loads((output / CONVERSION_REPORT).read_text())
    assert report["source"] == "vit-bert" and report["weights_used"] > 0
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    inputs = processor(text=["w1 w2 w9"], return_tensors="pt")
    with torch.no_grad():  # the copied text tower computes the source's function, through the CLI and AutoModel
        ours = model.text_model(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
        theirs = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()(**inputs).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # a second run into the same, now full, folder is refused before anything is written
    assert convert_main(["--from", "vit-bert", str(vision_dir), str(output), "--text-source", str(bert_dir)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert convert_main(["--from", "vit-bert", str(vision_dir), str(tmp_path / "other")]) == 2
    assert "--text-source" in capsys.readouterr().err
