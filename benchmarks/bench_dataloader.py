"""The data pipeline on this machine's cores: what stage-aware collation saves, whether DataLoader
workers pay, and what thread counts do when two trainings share the machine.

* collate: milliseconds per batch of the collator building every part (stage-blind, as before)
  against building what each stage of the paper's progressive schedule needs (stage-aware);
* workers: `regionmed-train` steps per second (tiny preset, the run's own `train_runtime`) with 0, 1
  and 2 DataLoader workers, at the default threads and at 1 thread;
* two jobs: two `regionmed-train` runs at once, at 2 threads each and at 1 thread each: the wall
  time of each against one run alone.

    python benchmarks/bench_dataloader.py --output benchmarks/results/bench_dataloader.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from benchmark_report import cpu_model, write_report  # noqa: E402

from regionmed_clip.data.schema import load_canonical  # noqa: E402
from regionmed_clip.data.synthetic import write_synthetic_dataset  # noqa: E402
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, build_tokenizer  # noqa: E402
from regionmed_clip.training_scripts.collator import RegionMedCLIPCollator  # noqa: E402
from regionmed_clip.training_scripts.schedule import PROGRESSIVE_STAGES, StagedSchedule  # noqa: E402


def collate_times(data_dir: Path, batch: int, repeats: int) -> dict[str, Any]:
    """Median ms per batch, stage-blind and stage-aware, at the start step of each progressive stage."""
    rows = list(load_canonical(data_dir, "train", decode_images=False))
    corpus = [row["report_caption"] for row in rows] + [r["caption"] for row in rows for r in row["regions"]]
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(image_size=224, roi_size=112, max_rois=8),
                                       build_tokenizer(corpus, vocab_size=2000))
    schedule = StagedSchedule(PROGRESSIVE_STAGES, max_steps=100)
    blind = RegionMedCLIPCollator(processor)
    aware = RegionMedCLIPCollator(processor, schedule=schedule, lookahead_steps=0)
    batches = [rows[start:start + batch] for start in range(0, len(rows) - batch + 1, batch)]
    figures: dict[str, Any] = {}
    for stage in schedule.stages:
        aware.set_step(stage.start)
        times: dict[str, list[float]] = {"stage_blind": [], "stage_aware": []}
        for _ in range(repeats):
            for name, collator in (("stage_blind", blind), ("stage_aware", aware)):
                for rows_of_batch in batches:
                    started = time.perf_counter()
                    collator(rows_of_batch)
                    times[name].append(time.perf_counter() - started)
        blind_ms, aware_ms = (1000 * statistics.median(times[name]) for name in ("stage_blind", "stage_aware"))
        figures[stage.name] = {"stage_blind_ms": round(blind_ms, 1), "stage_aware_ms": round(aware_ms, 1),
                               "speedup": round(blind_ms / aware_ms, 2)}
        print(stage.name, figures[stage.name], flush=True)
    return figures


def train_command(data_dir: Path, output_dir: Path, config: Path, steps: int, threads: int | None) -> list[str]:
    command = [sys.executable, "-m", "regionmed_clip.training_scripts.train", "--preset", "tiny", "--data", str(data_dir),
               "--output-dir", str(output_dir), "--max-steps", str(steps), "--save-steps", str(10 * steps),
               "--seed", "0", "--config", str(config), "--overwrite"]
    return command + (["--threads", str(threads)] if threads else [])


def run_config(folder: Path, workers: int, batch: int) -> Path:
    path = folder / f"workers{workers}.yaml"
    path.write_text(yaml.safe_dump({"training_args": {"dataloader_num_workers": workers, "logging_steps": 10,
                                                      "per_device_train_batch_size": batch, "disable_tqdm": True}}))
    return path


def runtime(output_dir: Path) -> float:
    """The run's own `train_runtime` (the training loop, without start-up)."""
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return float(next(entry for entry in map(json.loads, reversed(lines)) if "train_runtime" in entry)["train_runtime"])


def start(command: list[str]) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment.pop("OMP_NUM_THREADS", None)  # --threads decides
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen) -> None:
    _, errors = process.communicate(timeout=1800)
    if process.returncode != 0:
        raise RuntimeError(f"training failed (rc {process.returncode}):\n{errors[-3000:]}")


def workers_and_threads(data_dir: Path, folder: Path, steps: int, batch: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for threads in (None, 1):
        for workers in (0, 1, 2):
            key = f"workers_{workers}_threads_{threads or 'default'}"
            out = folder / key
            finish(start(train_command(data_dir, out, run_config(folder, workers, batch), steps, threads)))
            seconds = runtime(out)
            figures[key] = {"train_runtime_seconds": round(seconds, 2), "steps_per_second": round(steps / seconds, 3)}
            print(key, figures[key], flush=True)
    return figures


def two_jobs(data_dir: Path, folder: Path, steps: int, batch: int) -> dict[str, Any]:
    config = run_config(folder, 0, batch)
    figures: dict[str, Any] = {}
    for threads in (2, 1):
        alone = folder / f"alone_{threads}"
        finish(start(train_command(data_dir, alone, config, steps, threads)))
        outs = [folder / f"pair_{threads}_{index}" for index in range(2)]
        processes = [start(train_command(data_dir, out, config, steps, threads)) for out in outs]
        for process in processes:
            finish(process)
        pair = [runtime(out) for out in outs]
        figures[f"threads_{threads}"] = {"alone_seconds": round(runtime(alone), 2),
                                         "together_seconds": [round(value, 2) for value in pair],
                                         "slowdown": round(statistics.mean(pair) / runtime(alone), 2)}
        print(threads, figures[f"threads_{threads}"], flush=True)
    pair_2, pair_1 = (statistics.mean(figures[f"threads_{t}"]["together_seconds"]) for t in (2, 1))
    figures["two_jobs_at_2_threads_over_1_thread"] = round(pair_2 / pair_1, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the rows per collate figure")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        data_dir = folder / "data"
        write_synthetic_dataset(data_dir, n=args.rows, seed=0)
        figures = {"cpu": cpu_model(), "cores": os.cpu_count(), "batch": args.batch, "steps": args.steps,
                   "collate": collate_times(data_dir, args.batch, args.repeats),
                   "workers": workers_and_threads(data_dir, folder, args.steps, args.batch),
                   "two_jobs": two_jobs(data_dir, folder, args.steps, args.batch)}
    print(figures)
    write_report(figures, args.output)


if __name__ == "__main__":
    main()
