import json

import pytest

from training_scripts.demo import main
from training_scripts.push import check_hub_folder

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_on_a_small_budget(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--n", "60", "--max-steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "[5/5] the export reloads in a fresh offline process" in out and str(tmp_path / "run" / "final") in out
    assert "same embedding" in out and "total time" in out
    report = json.loads((tmp_path / "probe.json").read_text())
    # the probe ran on the test split (every 10th film) against the global-only ablation trained beside it
    assert report["metadata"]["n_images"] == 6
    assert report["baseline"]["model"] == str(tmp_path / "global_only" / "final")
    assert set(report["regions"]["conditions"]) == {"true", "crops_blanked", "boxes_mirrored", "box_geometry_removed"}
    for run in ("run", "global_only"):
        assert (tmp_path / run / "loss_curves.png").exists()
        logged = [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        assert logged[-1]["step"] == 6
    # the ablation never saw a region term
    assert not any(key.startswith("loss_region") for key in logged[0])
    # evaluated and exported: results for the card, a Hub folder that passes regionmed-push's checks
    for task in ("zero-shot", "region"):
        assert json.loads((tmp_path / "eval" / task / "results.json").read_text())["task"] == task
    assert check_hub_folder(tmp_path / "hub")["model_index_results"] > 0
