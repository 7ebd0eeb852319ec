import json

import pytest

from training_scripts.demo import main

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_on_a_small_budget(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--n", "60", "--max-steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "[3/3]" in out and str(tmp_path / "run" / "final") in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["evaluated_pairs"] >= 2
    for name in ("with_regions", "global_only"):
        assert 0 <= metrics[name]["text_to_image_R@1"] <= 100
    assert (tmp_path / "run" / "loss_curves.png").exists()
