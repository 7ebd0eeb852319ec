import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from regionmed_clip.processing import (
    RegionMedCLIPImageProcessor,
    RegionMedCLIPProcessor,
    build_tokenizer,
    load_tokenizer,
)

from conftest import tiny_config, tiny_model

CORPUS = [
    "small nodule in the left upper zone",
    "no nodule in the right upper zone",
    "moderate right pleural effusion with basal consolidation",
    "calcified granuloma in the left lower zone",
    "the heart size is normal and the lungs are clear",
] * 20


@pytest.fixture(scope="module")
def processor() -> RegionMedCLIPProcessor:
    image_processor = RegionMedCLIPImageProcessor(image_size=64, roi_size=32, max_rois=4)
    return RegionMedCLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer(CORPUS, vocab_size=300))


def images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (120 + 10 * i, 100), dtype=np.uint8) for i in range(count)]


FULL_CALL = {
    "text": ["small nodule in the left upper zone", "effusion"],
    "summary_text": ["nodule", "effusion"],
    "regions": [[[10, 10, 40, 40], [50, 60, 90, 100]], [[0, 0, 30, 30]]],
    "region_text": [["nodule left upper", "clear right"], ["right pleural effusion"]],
    "negative_text": [["nodule in the right upper zone"], ["left pleural effusion", "no effusion", "large effusion"]],
}


def test_full_call_shapes_line_up(processor):
    out = processor(images=images(2), **FULL_CALL, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 64, 64)
    assert out["roi_pixel_values"].shape == (2, 2, 3, 32, 32)
    assert out["roi_mask"].tolist() == [[True, True], [True, False]]
    assert out["input_ids"].shape == out["attention_mask"].shape and out["input_ids"].shape[0] == 2
    assert out["summary_input_ids"].shape[0] == 2
    batch, slots, length = out["region_input_ids"].shape
    assert (batch, slots) == (2, 2) and out["region_attention_mask"].shape == (2, 2, length)
    assert out["region_attention_mask"][1, 1].sum() == 0  # padding slot
    assert out["negative_input_ids"].shape[:2] == (2, 3)
    assert out["negative_mask"].tolist() == [[True, False, False], [True, True, True]]
    cls_id = processor.tokenizer.cls_token_id
    assert torch.all(out["input_ids"][:, 0] == cls_id)
    assert torch.all(out["region_input_ids"][out["roi_mask"]][:, 0] == cls_id)


def test_region_captions_are_aligned_with_their_slots(processor):
    out = processor(images=images(2), **FULL_CALL, return_tensors="np")
    alone = processor(text=["right pleural effusion"], return_tensors="np")
    length = alone["input_ids"].shape[1]
    np.testing.assert_array_equal(out["region_input_ids"][1, 0, :length], alone["input_ids"][0])


def test_outputs_feed_the_model():
    model = tiny_model()
    image_processor = RegionMedCLIPImageProcessor(image_size=64, roi_size=32, max_rois=4)
    tokenizer = build_tokenizer(CORPUS, vocab_size=model.config.text_config.vocab_size)
    batch = RegionMedCLIPProcessor(image_processor, tokenizer)(images=images(2), **FULL_CALL)
    keys = ("pixel_values", "input_ids", "attention_mask", "roi_pixel_values", "roi_boxes", "roi_mask")
    out = model(**{key: batch[key] for key in keys}, return_loss=True)
    assert out.region_embeds.shape == (2, 2, model.config.projection_dim)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    ("call", "present"),
    [
        ({"images": "IMAGES"}, {"pixel_values", "proposal_pixel_values", "proposal_boxes", "proposal_mask"}),
        ({"images": "IMAGES", "proposals": False}, {"pixel_values"}),
        ({"text": ["nodule"]}, {"input_ids", "attention_mask"}),
        ({"images": "IMAGES", "regions": [[[0, 0, 9, 9]], []]}, {"pixel_values", "roi_pixel_values", "roi_boxes", "roi_mask"}),
        ({"summary_text": "nodule"}, {"summary_input_ids", "summary_attention_mask"}),
    ],
)
def test_any_subset_works(processor, call, present):
    call = {key: images(2) if value == "IMAGES" else value for key, value in call.items()}
    assert set(processor(**call).keys()) == present


def test_truncation_at_256_tokens(processor):
    assert processor.tokenizer.model_max_length == 256
    out = processor(text=["nodule " * 400])
    assert out["input_ids"].shape[1] == 256


def test_max_rois_cut_keeps_the_matching_captions(processor):
    boxes = [[[5 * i, 5, 5 * i + 20, 30] for i in range(6)]]
    captions = [[f"nodule {i}" for i in range(6)]]
    out = processor(images=images(1), regions=boxes, region_text=captions, return_tensors="np")
    assert out["region_input_ids"].shape[1] == 4
    expected = processor(text=["nodule 3"], return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(out["region_input_ids"][0, 3, : len(expected)], expected)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        ({"regions": [[[0, 0, 9, 9]], []], "region_text": [["a"], ["b"]]}, ValueError,
         r"region_text\[1\] has 1 captions but regions\[1\] has 0"),
        ({"region_text": [["a"], []]}, ValueError, "region_text needs regions"),
        ({"summary_text": ["only one"]}, ValueError, "one caption per image: 2 images, got 1"),
        ({"negative_text": [["a"]]}, ValueError, "negative_text needs one list per image"),
        ({"negative_text": ["a", "b"]}, TypeError, r"negative_text\[0\] must be a list"),
        ({"text": ["ok", 3]}, TypeError, r"text\[1\] must be a str"),
    ],
)
def test_mismatched_inputs_name_the_argument(processor, call, error, message):
    with pytest.raises(error, match=message):
        processor(images=images(2), **call)


def test_per_image_inputs_without_images_are_rejected(processor):
    with pytest.raises(ValueError, match="regions needs images"):
        processor(text=["a"], regions=[[[0, 0, 1, 1]]])


def test_tokenizer_train_save_load(tmp_path):
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id] == [0, 1, 2]
    assert len(tokenizer) <= 300
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "Small NODULE in the left upper zone"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.model_max_length == 256
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]  # lowercased, in-vocabulary


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="texts is empty"):
        build_tokenizer([], vocab_size=100)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        build_tokenizer(["a", None], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_a_processor_folder_loads_its_tokenizer_without_asking_and_names_a_missing_one(processor, tmp_path):
    import builtins

    from transformers import AutoProcessor

    from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPModel

    RegionMedCLIPModel(tiny_config()).save_pretrained(tmp_path)  # a model folder: config.json with auto_map
    processor.save_pretrained(tmp_path)

    def no_prompt(*args, **kwargs):
        raise AssertionError(f"asked on stdin: {args}")

    original_input, builtins.input = builtins.input, no_prompt
    try:  # the tokenizer alone: loading it must not read the remote-code config.json, nor ask
        assert load_tokenizer(tmp_path)("a nodule")["input_ids"] == processor.tokenizer("a nodule")["input_ids"]
    finally:
        builtins.input = original_input
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.tokenizer("a nodule")["input_ids"] == processor.tokenizer("a nodule")["input_ids"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in '{tmp_path}'"):
        AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)


LOAD_AND_RUN = textwrap.dedent(
    """
    import pickle, sys
    from transformers import AutoProcessor
    processor_dir, call_path, out_path = sys.argv[1:4]
    processor = AutoProcessor.from_pretrained(processor_dir, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    call = pickle.load(open(call_path, "rb"))
    out = processor(**call, return_tensors="np")
    pickle.dump({k: v for k, v in out.items()}, open(out_path, "wb"))
    """
)


def test_remote_code_round_trip_in_a_fresh_offline_process(processor, tmp_path):
    import pickle

    processor.save_pretrained(tmp_path / "processor")
    call = {"images": images(2), **FULL_CALL}
    (tmp_path / "call.pkl").write_bytes(pickle.dumps(call))
    (tmp_path / "run.py").write_text(LOAD_AND_RUN)
    env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "cwd").mkdir()
    result = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "processor"), str(tmp_path / "call.pkl"),
         str(tmp_path / "out.pkl")],
        cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = pickle.loads((tmp_path / "out.pkl").read_bytes())
    expected = processor(**call, return_tensors="np")
    assert set(reloaded) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(reloaded[key], expected[key], err_msg=key)


def test_tokenizer_is_deterministic_across_processes():
    import json
    from pathlib import Path

    script = (
        "import json, sys\n"
        "from regionmed_clip.processing import build_tokenizer\n"
        f"print(json.dumps(sorted(build_tokenizer(json.loads({json.dumps(json.dumps(CORPUS))}), vocab_size=300)"
        ".get_vocab().items())))\n"
    )
    root = Path(__file__).resolve().parents[1]
    other_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # string hashing unlike this process's
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root,
                           env={**os.environ, "PYTHONHASHSEED": other_seed}).stdout
    this = sorted(build_tokenizer(CORPUS, vocab_size=300).get_vocab().items())
    assert [tuple(pair) for pair in json.loads(other)] == this and "nodule" in dict(this)


def test_words_not_in_the_vocabulary_fall_back_to_characters():
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    tokens = tokenizer.tokenize("noduleS zonez")
    assert tokens[:2] == ["nodule", "##s"] and "[UNK]" not in tokens
    with pytest.raises(ValueError, match="use at least"):
        build_tokenizer(CORPUS, vocab_size=20)


def test_region_negatives_line_up_with_their_region_slots(processor):
    region_negatives = [[["nodule right upper", "mass left upper"], []], [["left pleural effusion"]]]
    out = processor(images=images(2), **FULL_CALL, region_negative_text=region_negatives, return_tensors="np")
    batch, slots, most, length = out["region_negative_input_ids"].shape
    assert (batch, slots, most) == (2, 2, 2) and out["region_negative_attention_mask"].shape == (2, 2, 2, length)
    assert out["region_negative_mask"].tolist() == [[[True, True], [False, False]], [[True, False], [False, False]]]
    alone = processor(text=["left pleural effusion"], return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(out["region_negative_input_ids"][1, 0, 0, : len(alone)], alone)
    assert out["region_negative_attention_mask"][0, 1].sum() == 0  # a region without negatives is all padding


def test_region_negatives_need_one_list_per_region(processor):
    with pytest.raises(ValueError, match=r"region_negative_text\[1\] needs one list of negatives per region"):
        processor(images=images(2), **FULL_CALL, region_negative_text=[[[], []], []])
    with pytest.raises(ValueError, match="region_negative_text needs region_text"):
        processor(images=images(2), regions=FULL_CALL["regions"], region_negative_text=[[[], []], [[]]])


def test_caption_level_table_names_every_output(processor):
    from regionmed_clip.processing import CAPTION_LEVELS, PROPOSAL_INPUT_NAMES, caption_level

    call = {**FULL_CALL, "region_negative_text": [[["a"], ["b", "c"]], [["d"]]]}
    out = processor(images=images(2), **call, return_tensors="pt")
    # every level's inputs, nothing else (with regions given, no box-free proposals)
    assert set(out) == set(processor.model_input_names) - set(PROPOSAL_INPUT_NAMES)
    for level in CAPTION_LEVELS:
        assert level.argument in call, level.name  # each level has its processor argument
        ids = out[level.input_names[0]]
        assert ids.ndim == len(level.shape.strip("()").split(", ")), level.name
    assert caption_level("negative").input_names == ("negative_input_ids", "negative_attention_mask", "negative_mask")
    with pytest.raises(KeyError, match="unknown caption level 'findings'"):
        caption_level("findings")


def test_each_stage_feeds_exactly_the_levels_its_terms_read():
    from regionmed_clip.training_scripts.schedule import PROGRESSIVE_STAGES, StagedSchedule
    from regionmed_clip.training_scripts.trainer import stage_input_names

    warmup, refine, roi, _ = StagedSchedule(PROGRESSIVE_STAGES, 100).stages
    assert stage_input_names(warmup) == ["pixel_values", "input_ids", "attention_mask"]
    assert stage_input_names(refine) == ["pixel_values", "input_ids", "attention_mask", "summary_input_ids",
                                         "summary_attention_mask"]
    assert stage_input_names(roi)[:4] == ["pixel_values", "roi_pixel_values", "roi_boxes", "roi_mask"]
    assert "region_negative_mask" in stage_input_names(roi)
