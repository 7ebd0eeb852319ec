"""`model_from_vision_text_pretrained`: start from local ViT / CLIP-vision and BERT checkpoints."""

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

from regionmed_clip.training_scripts.tower_conversion import model_from_vision_text_pretrained

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
