"""transformers' own common model and config tests, run on RegionMed-CLIP's models.

`ModelTesterMixin` and `ConfigTester` come from the installed transformers release
(tests/transformers_suite.py fetches them). The testers follow transformers' CLIP tests
(tests/models/clip/test_modeling_clip.py): the same tower sizes and inputs, and per test class the
skips `CLIPVisionModelTest`, `CLIPTextModelTest` and `CLIPModelTest` declare, no others; the VQA
model takes the composite model's (`CLIPModelTest`) profile.
"""

import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers_suite import REQUIRE_VARIABLE, CommonTestsUnavailable, common_test_modules, suite_required

from regionmed_clip.modeling_regionmed_clip import (
    RegionMedCLIPConfig,
    RegionMedCLIPForVQA,
    RegionMedCLIPModel,
    RegionMedCLIPTextConfig,
    RegionMedCLIPTextModel,
    RegionMedCLIPTextModelWithProjection,
    RegionMedCLIPVisionConfig,
    RegionMedCLIPVisionModel,
    RegionMedCLIPVisionTowerWithProjection,
)

try:
    modeling_common, configuration_common = common_test_modules()
except CommonTestsUnavailable as error:
    if suite_required():  # CI must run them: a fetch that fails there is an error, never a quiet skip
        raise
    pytest.skip(error.reason, allow_module_level=True)
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
floats_tensor, ids_tensor = modeling_common.floats_tensor, modeling_common.ids_tensor
random_attention_mask = modeling_common.random_attention_mask


class VisionTester:
    """CLIPVisionModelTester's sizes: 30 px images of 2 px patches, 2 layers of width 32."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 12, image_size: int = 30, patch_size: int = 2):
        self.parent, self.batch_size = parent, batch_size
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, 3
        self.hidden_size, self.projection_dim = 32, 32
        self.num_hidden_layers, self.num_attention_heads = 2, 4
        self.is_training = True
        self.seq_length = (image_size // patch_size) ** 2 + 1  # patches + [CLS]

    def get_config(self) -> RegionMedCLIPVisionConfig:
        return RegionMedCLIPVisionConfig(
            image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.hidden_size,
            projection_dim=self.projection_dim, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=37, hidden_dropout=0.1,
            attention_dropout=0.1, initializer_range=0.02)

    def prepare_config_and_inputs(self) -> tuple[RegionMedCLIPVisionConfig, torch.Tensor]:
        return self.get_config(), floats_tensor([self.batch_size, 3, self.image_size, self.image_size])

    def prepare_config_and_inputs_for_common(self) -> tuple[RegionMedCLIPVisionConfig, dict]:
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class TextTester:
    """CLIPTextModelTester's sizes and right-padded masks: 7 tokens of a 99-token vocabulary."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 12, seq_length: int = 7):
        self.parent, self.batch_size, self.seq_length = parent, batch_size, seq_length
        self.vocab_size, self.hidden_size, self.projection_dim = 99, 32, 32
        self.num_hidden_layers, self.num_attention_heads = 2, 4
        self.is_training = True

    def get_config(self) -> RegionMedCLIPTextConfig:
        return RegionMedCLIPTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, projection_dim=self.projection_dim,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            intermediate_size=37, hidden_dropout=0.1, attention_dropout=0.1, max_position_embeddings=512,
            initializer_range=0.02)

    def prepare_config_and_inputs(self) -> tuple[RegionMedCLIPTextConfig, torch.Tensor, torch.Tensor]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length])
        for row, start in enumerate(np.random.randint(1, self.seq_length - 1, size=(self.batch_size,))):
            input_mask[row, :start], input_mask[row, start:] = 1, 0
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self) -> tuple[RegionMedCLIPTextConfig, dict]:
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


class ModelTester:
    """CLIPModelTester: both towers' testers, a 64-d shared space; plus two ROI slots per image (the
    second one padding in every other image), so that every parameter takes part."""

    def __init__(self, parent: unittest.TestCase, num_answers: int = 0):
        self.parent = parent
        self.text_model_tester, self.vision_model_tester = TextTester(parent), VisionTester(parent)
        self.batch_size = self.text_model_tester.batch_size
        self.num_answers = num_answers
        self.roi_image_size = 8
        self.is_training = True

    def get_config(self) -> RegionMedCLIPConfig:
        labels = {"id2label": {index: f"answer {index}" for index in range(self.num_answers)}} if self.num_answers else {}
        return RegionMedCLIPConfig(
            text_config=self.text_model_tester.get_config().to_dict(),
            vision_config=self.vision_model_tester.get_config().to_dict(),
            projection_dim=64, roi_image_size=self.roi_image_size, roi_fusion_heads=4, roi_fusion_layers=1, max_rois=2,
            vqa_fusion_layers=1, vqa_fusion_heads=4, **labels)

    def prepare_config_and_inputs_for_common(self) -> tuple[RegionMedCLIPConfig, dict]:
        _, input_ids, attention_mask = self.text_model_tester.prepare_config_and_inputs()
        _, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        batch, roi_size = self.batch_size, self.roi_image_size
        corners = torch.rand(batch, 2, 2) * 0.5
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "roi_pixel_values": floats_tensor([batch, 2, 3, roi_size, roi_size]),
                  "roi_boxes": torch.cat([corners, corners + 0.4], dim=-1),
                  "roi_mask": torch.stack([torch.ones(batch, dtype=torch.bool), torch.arange(batch) % 2 == 0], dim=1)}
        if self.num_answers:
            inputs["labels"] = ids_tensor([self.batch_size], self.num_answers)
        else:
            inputs["return_loss"] = True
        return self.get_config(), inputs


class RegionMedCLIPTesterMixin(ModelTesterMixin):
    """CLIPModelTesterMixin's SDPA dispatch check: every tower resolves the requested backend."""

    def test_sdpa_can_dispatch_composite_models(self):
        for model_class in self.all_model_classes:
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            with tempfile.TemporaryDirectory() as folder:
                model_class(config).save_pretrained(folder)
                sdpa = model_class.from_pretrained(folder, attn_implementation="sdpa")
                eager = model_class.from_pretrained(folder, attn_implementation="eager")
            self.assertEqual((sdpa.config._attn_implementation, eager.config._attn_implementation), ("sdpa", "eager"))
            for tower in ("vision_model", "text_model"):
                if hasattr(sdpa, tower):
                    self.assertEqual(getattr(sdpa, tower).config._attn_implementation, "sdpa")
                    self.assertEqual(getattr(eager, tower).config._attn_implementation, "eager")


class TowerTests(RegionMedCLIPTesterMixin):
    """The skips CLIPVisionModelTest and CLIPTextModelTest both declare."""

    test_resize_embeddings = False

    @unittest.skip(reason="CLIP does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip
    def test_training(self):
        pass

    @unittest.skip
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(reason="CLIPModelTest: computes no gradient properly with GC (transformers PR 27124)")
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip(reason="CLIPModelTest: computes no gradient properly with GC (transformers PR 27124)")
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass


class RegionMedCLIPVisionModelTest(TowerTests, unittest.TestCase):
    all_model_classes = (RegionMedCLIPVisionModel, RegionMedCLIPVisionTowerWithProjection)

    def setUp(self):
        self.model_tester = VisionTester(self)
        self.config_tester = ConfigTester(self, config_class=RegionMedCLIPVisionConfig, has_text_modality=False,
                                          hidden_size=37, num_attention_heads=1)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, pixel_values = self.model_tester.prepare_config_and_inputs()
        with torch.no_grad():
            result = RegionMedCLIPVisionModel(config).eval()(pixel_values)
            projected = RegionMedCLIPVisionTowerWithProjection(config).eval()(pixel_values)
        tester = self.model_tester
        self.assertEqual(result.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))
        self.assertEqual(result.pooler_output.shape, (tester.batch_size, tester.hidden_size))
        self.assertEqual(projected.image_embeds.shape, (tester.batch_size, tester.projection_dim))

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())


class RegionMedCLIPTextModelTest(TowerTests, unittest.TestCase):
    all_model_classes = (RegionMedCLIPTextModel, RegionMedCLIPTextModelWithProjection)
    model_split_percents = [0.5, 0.8, 0.9]

    def setUp(self):
        self.model_tester = TextTester(self)
        self.config_tester = ConfigTester(self, config_class=RegionMedCLIPTextConfig, hidden_size=37,
                                          num_attention_heads=1)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, input_ids, input_mask = self.model_tester.prepare_config_and_inputs()
        with torch.no_grad():
            result = RegionMedCLIPTextModel(config).eval()(input_ids, attention_mask=input_mask)
            projected = RegionMedCLIPTextModelWithProjection(config).eval()(input_ids, attention_mask=input_mask)
        tester = self.model_tester
        self.assertEqual(result.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))
        self.assertEqual(result.pooler_output.shape, (tester.batch_size, tester.hidden_size))
        self.assertEqual(projected.text_embeds.shape, (tester.batch_size, tester.projection_dim))


class CompositeTests(RegionMedCLIPTesterMixin):
    """The flags and skips CLIPModelTest declares."""

    test_resize_embeddings = False
    test_attention_outputs = False
    _is_composite = True
    additional_model_inputs = ["input_ids"]  # our main input is pixel_values, CLIP's input_ids

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="Hidden_states is tested in individual model tests")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="Inputs_embeds is tested in individual model tests")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Retain_grad is tested in individual model tests")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="CLIPModel does not have input/output embeddings")
    def test_model_get_set_embeddings(self):
        pass

    def test_load_vision_text_config(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        with tempfile.TemporaryDirectory() as folder:
            config.save_pretrained(folder)
            self.assertDictEqual(config.vision_config.to_dict(), RegionMedCLIPVisionConfig.from_pretrained(folder).to_dict())
            self.assertDictEqual(config.text_config.to_dict(), RegionMedCLIPTextConfig.from_pretrained(folder).to_dict())


class RegionMedCLIPModelTest(CompositeTests, unittest.TestCase):
    all_model_classes = (RegionMedCLIPModel,)

    def setUp(self):
        self.model_tester = ModelTester(self)
        self.config_tester = ConfigTester(self, config_class=RegionMedCLIPConfig, has_text_modality=False,
                                          common_properties=["projection_dim", "logit_scale_init_value"])

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        with torch.no_grad():
            result = RegionMedCLIPModel(config).eval()(**inputs)
        batch = self.model_tester.batch_size
        self.assertEqual(result.logits_per_image.shape, (batch, batch))
        torch.testing.assert_close(result.logits_per_text, result.logits_per_image.t())


class RegionMedCLIPForVQATest(CompositeTests, unittest.TestCase):
    all_model_classes = (RegionMedCLIPForVQA,)

    def setUp(self):
        self.model_tester = ModelTester(self, num_answers=5)
        self.config_tester = ConfigTester(self, config_class=RegionMedCLIPConfig, has_text_modality=False,
                                          common_properties=["projection_dim", "vqa_fusion_layers"])

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        with torch.no_grad():
            result = RegionMedCLIPForVQA(config).eval()(**inputs)
        self.assertEqual(result.logits.shape, (self.model_tester.batch_size, 5))
        torch.testing.assert_close(result.loss, torch.nn.functional.cross_entropy(result.logits, inputs["labels"]))


# -- the suite's own fetch: a failure skips it loudly, except where it is required -------------------


def _pytest_without_the_index(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    """This module and one other test run by pytest in a fresh process with an empty test cache and pip
    pointed at an index that refuses connections (its configuration files and PIP_* variables left
    out). The other test stands for the rest of the suite: a session whose only module skips collects
    nothing, which pytest reports with exit code 5."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PIP_") and key not in ("CI", REQUIRE_VARIABLE)}
    env.update(REGIONMED_TEST_CACHE=str(tmp_path / "cache"), PIP_CONFIG_FILE=os.devnull,
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="5", **environment)
    tests = Path(__file__).resolve().parent
    other = f"{tests / 'test_losses.py'}::test_single_positive_is_cross_entropy"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(Path(__file__)),
                           other], cwd=tests.parent, env=env, capture_output=True, text=True, timeout=300)


def test_an_unreachable_index_skips_the_suite_with_the_reason(tmp_path):
    result = _pytest_without_the_index(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "1 passed, 1 skipped" in output, output[-3000:]
    for words in ("common model tests (ModelTesterMixin, ConfigTester) NOT RUN", "could not fetch transformers",
                  "exited 1", str(tmp_path / "cache"), REQUIRE_VARIABLE):
        assert words in output, (words, output[-3000:])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.py"))  # nothing half-made


def test_where_the_suite_is_required_an_unreachable_index_fails_the_run(tmp_path):
    # CI (`CI` set) requires it the same way: test_ci_requires_the_suite_and_the_variable_decides_first
    result = _pytest_without_the_index(tmp_path, **{REQUIRE_VARIABLE: "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "1 error" in output and "skipped" not in output, output[-3000:]
    assert "CommonTestsUnavailable" in output and "could not fetch transformers" in output, output[-3000:]


def test_ci_requires_the_suite_and_the_variable_decides_first(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(REQUIRE_VARIABLE, raising=False)
    assert not suite_required()
    for value, required in (("false", False), ("0", False), ("", False), ("true", True), ("1", True)):
        monkeypatch.setenv("CI", value)
        assert suite_required() is required, value
    monkeypatch.setenv(REQUIRE_VARIABLE, "0")  # an explicit waiver wins over CI
    assert not suite_required()
    monkeypatch.delenv("CI")
    monkeypatch.setenv(REQUIRE_VARIABLE, "1")
    assert suite_required()
