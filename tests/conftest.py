"""Shared fixtures: tiny configs and deterministic model inputs."""

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers_suite import COMMON_TEST_MARKERS

from regionmed_clip.apps.app_driver import free_port  # noqa: F401 - the tests' free port, one copy
from regionmed_clip.data.schema import load_canonical
from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, build_tokenizer
from regionmed_clip.training_scripts.schedule import DEFAULT_STAGES
from regionmed_clip.training_scripts.train import DEFAULT_TRAINING_ARGS, build_trainer

SHORT_TRAINING_STEPS = 120


# Expensive session or module fixtures and the test files that use them. Under `make test`'s pytest-xdist workers
# each fixture's files run on one worker, so it is built once rather than once per worker; every other test is
# scheduled on its own (as `--dist load`).
SHARED_FIXTURE_FILES = {
    "short_training": ("test_learning.py", "test_app_browser.py"),  # the session's short training (55 s)
    "workspace": ("test_console_scripts.py",),  # the console scripts' data and run (30 s)
}

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Each worker gets its share of the cores, and so do the processes its tests start (two 2-thread jobs on 2
    # cores slowed each other several times over); a thread count the user set is kept.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config: pytest.Config) -> None:
    for marker in COMMON_TEST_MARKERS:
        config.addinivalue_line("markers", f"{marker}: used by transformers' common model tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, files in SHARED_FIXTURE_FILES.items():
            if fixture in item.fixturenames and item.path.name not in files:
                raise pytest.UsageError(f"{item.nodeid} uses the {fixture!r} fixture: add {item.path.name!r} to its "
                                        "files in SHARED_FIXTURE_FILES (tests/conftest.py)")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist load` (xdist's default), except that the files sharing a fixture of `SHARED_FIXTURE_FILES` go to one
    worker. (xdist's `--dist loadgroup` would do it with marks, but under pytest 9.2 it silently groups nothing.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    group_of_file = {name: fixture for fixture, files in SHARED_FIXTURE_FILES.items() for name in files}

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of_file.get(Path(nodeid.split("::")[0]).name, nodeid)

    return SharedFixtureScheduling(config, log)


def tiny_config(**overrides) -> RegionMedCLIPConfig:
    """The tiny preset (no text dropout) without box dropout, so training-mode passes are deterministic."""
    overrides.setdefault("roi_box_dropout", 0.0)
    return RegionMedCLIPConfig.from_preset("tiny", **overrides)


def tiny_model(seed: int = 0, **overrides) -> RegionMedCLIPModel:
    torch.manual_seed(seed)
    return RegionMedCLIPModel(tiny_config(**overrides)).eval()


def make_inputs(
    config: RegionMedCLIPConfig,
    rois_per_image: list[int],
    num_slots: int | None = None,
    seq_len: int = 24,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A batch with `rois_per_image[b]` valid ROIs in image b, padded to `num_slots` slots.

    Padding slots hold random junk (as a careless collator might), so tests prove it is ignored.
    Text rows are padded to different lengths.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = len(rois_per_image)
    slots = num_slots if num_slots is not None else max(rois_per_image)
    size, roi_size = config.vision_config.image_size, config.roi_image_size
    xy0 = torch.rand(batch, slots, 2, generator=generator) * 0.6
    wh = 0.1 + torch.rand(batch, slots, 2, generator=generator) * 0.3
    roi_mask = torch.arange(slots)[None, :] < torch.tensor(rois_per_image)[:, None]
    input_ids = torch.randint(5, config.text_config.vocab_size, (batch, seq_len), generator=generator)
    input_ids[:, 0] = config.text_config.cls_token_id
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        length = seq_len - 3 * row
        attention_mask[row, length:] = 0
        input_ids[row, length:] = config.text_config.pad_token_id
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "roi_pixel_values": torch.randn(batch, slots, 3, roi_size, roi_size, generator=generator),
        "roi_boxes": torch.cat([xy0, xy0 + wh], dim=-1),
        "roi_mask": roi_mask,
    }


@pytest.fixture
def config() -> RegionMedCLIPConfig:
    return tiny_config()


@pytest.fixture
def model() -> RegionMedCLIPModel:
    return tiny_model()


def collator_processor(rows) -> RegionMedCLIPProcessor:
    """A 64 px processor (32 px crops, 4 ROIs) whose tokenizer is trained on the canonical `rows`' captions."""
    corpus = [row["report_caption"] for row in rows] + [r["caption"] for row in rows for r in row["regions"]]
    return RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(image_size=64, roi_size=32, max_rois=4),
                                  build_tokenizer(corpus, vocab_size=400))


def build_saved_model(tmp_path: Path, n: int = 40) -> tuple[Path, Path, object, object]:
    """A tiny untrained model + processor folder, an `n`-row synthetic dataset (n / 10 test rows), and the
    in-memory model and processor that were saved."""
    data_dir, model_dir = tmp_path / "data", tmp_path / "model"
    write_synthetic_dataset(data_dir, n=n)
    # without the generator's sidecar the probe falls back to rule-made negatives; tests add their own
    shutil.rmtree(data_dir / "region_negatives")
    train = load_canonical(data_dir, "train").remove_columns("image")
    corpus = [text for row in train for text in (row["report_caption"], row["summary_caption"],
                                                 *[region["caption"] for region in row["regions"]])]
    model = tiny_model()
    config = model.config
    tokenizer = build_tokenizer(corpus, vocab_size=config.text_config.vocab_size)
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id) == (config.text_config.pad_token_id,
                                                                config.text_config.cls_token_id)
    model.save_pretrained(model_dir)
    processor = RegionMedCLIPProcessor(
        RegionMedCLIPImageProcessor(image_size=config.vision_config.image_size, roi_size=config.roi_image_size,
                                    max_rois=config.max_rois),
        tokenizer,
    )
    processor.save_pretrained(model_dir)
    return model_dir, data_dir, model, processor


def default_recipe_run(output_dir: Path, data_dir: Path, steps: int = SHORT_TRAINING_STEPS,
                       logging_steps: int | None = None, **data) -> dict:
    """The run config of the default recipe (tiny preset, batch 16, seed 0) on `data_dir`'s train split, logging
    every `logging_steps` (default: once, at the end)."""
    return {
        "model": {"preset": "tiny"},
        "data": {"path": str(data_dir), "split": "train", **data},
        "schedule": DEFAULT_STAGES,
        "training_args": {**DEFAULT_TRAINING_ARGS, "output_dir": str(output_dir), "max_steps": steps,
                          "per_device_train_batch_size": 16, "save_strategy": "no", "seed": 0,
                          "disable_tqdm": True, "logging_steps": logging_steps or steps},
    }


@pytest.fixture(scope="session")
def short_training(tmp_path_factory) -> SimpleNamespace:
    """The default recipe trained `SHORT_TRAINING_STEPS` steps on 200 synthetic films (seed 0), logging every 10
    steps, once per session: `trainer` (trained), `data_dir`, and `model_dir` (the trained model and processor)."""
    root = tmp_path_factory.mktemp("short_training")
    write_synthetic_dataset(root / "data", n=200, seed=0)
    trainer, _ = build_trainer(default_recipe_run(root / "windows", root / "data", logging_steps=10))
    trainer.train()
    trainer.save_model(str(root / "model"))
    trainer.processing_class.save_pretrained(root / "model")
    return SimpleNamespace(trainer=trainer, data_dir=root / "data", model_dir=root / "model")
