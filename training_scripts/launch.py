"""Several `regionmed-train` runs as subprocesses, a few at a time, one thread each (the demo and the
learning benchmark train the default recipe beside its global-only ablation this way)."""

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["GLOBAL_ONLY_CONFIG", "NO_BACKGROUND_CONFIG", "StepFailedError", "train_in_subprocesses"]

GLOBAL_ONLY_CONFIG = Path(__file__).parent / "configs" / "global_only.yaml"
NO_BACKGROUND_CONFIG = Path(__file__).parent / "configs" / "no_background_windows.yaml"


class StepFailedError(RuntimeError):
    """A step of a multi-step job (a training subprocess, a reload check) failed; the message says where to look."""

    exit_code = 1  # the console scripts' error boundary prints the message on one line (regionmed_clip.cli)


def train_in_subprocesses(runs: Mapping[Path, Sequence[str]], jobs: int = 2) -> None:
    """Run `python -m regionmed_clip.training_scripts.train ARGS --output-dir RUN_DIR` for every `RUN_DIR -> ARGS`,
    `jobs` at a time, each logging to `RUN_DIR.log`; StepFailedError naming the log of a failed run."""
    # One thread each: two trainings with the default two threads each slow each other down ~5x on 2 cores.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending = list(runs.items())
    running: list[tuple[subprocess.Popen, Path]] = []
    while pending or running:
        while pending and len(running) < jobs:
            run_dir, args = pending.pop(0)
            # `python -m regionmed_clip.training_scripts.train` is `regionmed-train`, without needing the venv on PATH
            command = [sys.executable, "-m", "regionmed_clip.training_scripts.train", *args, "--output-dir", str(run_dir)]
            print("running:", " ".join(command), flush=True)
            log_path = run_dir.with_suffix(".log")
            with log_path.open("w") as log:
                running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment),
                                log_path))
        process, log_path = running.pop(0)
        if process.wait() != 0:
            for other, _ in running:
                other.kill()
            raise StepFailedError(f"training failed (exit {process.returncode}): see {log_path}")
