"""Reliability at scale: a synthetic train split of `--rows` rows with `--corrupt-fraction` of them
made unusable (every kind the collator skips, in equal shares) and some regions broken, trained for
one epoch on the tiny preset with DataLoader workers. The run must finish, and its summary must count
exactly the rows and regions planted, by reason. RSS and open file descriptors of the training
process are sampled at start / middle / end (they must stay flat); checkpoints must rotate within
`save_total_limit`.

    python benchmarks/bench_at_scale.py --rows 10000 --output benchmarks/results/bench_at_scale.json
    # the soak: one epoch of 16,000 rows at batch 8 is 2,000 steps, a checkpoint every 200
    python benchmarks/bench_at_scale.py --rows 16000 --output benchmarks/results/bench_soak.json
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from benchmark_report import cpu_model, write_report  # noqa: E402

from regionmed_clip.data.synthetic import write_synthetic_dataset  # noqa: E402


def _nan_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), np.nan, dtype=np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


# Row-level damage: column -> new value, and the reason the collator must give.
ROW_DAMAGE = {
    "undecodable image": ("image", {"bytes": b"not an image", "path": None},
                          "row: image does not decode (UnidentifiedImageError)"),
    "NaN float image": ("image", {"bytes": _nan_tiff(), "path": None}, "row: image rejected by the processor (ValueError)"),
    "null report": ("report_caption", None, "row: report_caption is missing or null"),
    "blank summary": ("summary_caption", "   ", "row: summary_caption is empty"),
    "null negatives": ("negative_captions", None, "row: negative_captions is missing or null, not a list"),
    "null regions": ("regions", None, "row: regions is missing or null, not a list"),
}


def natural_region_problems(columns: dict[str, list]) -> dict[int, list[str]]:
    """Per row index, the reasons the collator already drops some of its regions for (the generator
    makes a few boxes that fall off the tiny preset's view): counted in the expectation, never damaged."""
    from regionmed_clip.processing import RegionMedCLIPImageProcessor
    from regionmed_clip.training_scripts.collator import _region_problem

    image_processor = RegionMedCLIPImageProcessor(image_size=128, roi_size=32, max_rois=4)
    problems = {}
    for index, (image, regions) in enumerate(zip(columns["image"], columns["regions"], strict=True)):
        size = Image.open(io.BytesIO(image["bytes"])).size
        found = [problem for region in regions if (problem := _region_problem(region, *size, image_processor))]
        if found:
            problems[index] = [f"region: {problem}" for problem in found]
    return problems


def plant(data_dir: Path, fraction: float, seed: int) -> dict[str, int]:
    """Damage `fraction` of the train rows (equal shares of ROW_DAMAGE) and null one region's box in as
    many other rows; returns the expected skip reasons with their counts."""
    shards = sorted(data_dir.glob("train-*.parquet"))
    table = pa.concat_tables([pq.read_table(shard) for shard in shards])
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    natural = natural_region_problems(columns)
    rng = np.random.default_rng(seed)
    count = round(fraction * table.num_rows)
    chosen = [int(i) for i in rng.permutation(table.num_rows) if int(i) not in natural]
    damaged, region_rows = chosen[:count], [i for i in chosen[count:] if columns["regions"][i]]
    expected: Counter[str] = Counter(reason for reasons in natural.values() for reason in reasons)
    for position, index in enumerate(damaged):
        column, value, reason = list(ROW_DAMAGE.values())[position % len(ROW_DAMAGE)]
        columns[column][index] = value
        expected[reason] += 1
    for index in region_rows[:count]:
        regions = columns["regions"][index]
        regions[0] = {**regions[0], "bbox": None}
        expected["region: bbox missing or null"] += 1
    rebuilt = pa.table({name: pa.array(values, table.schema.field(name).type) for name, values in columns.items()},
                       schema=table.schema)
    for shard in shards:
        shard.unlink()
    pq.write_table(rebuilt, data_dir / "train-00000.parquet")
    return dict(expected)


def _status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status
                if line.startswith(("VmRSS", "RssAnon", "RssFile"))}


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def process_stats(pid: int) -> dict[str, int]:
    """RSS (with its anonymous and file-backed parts: memory-mapped dataset pages are the latter, and
    reclaimable) and open file descriptors of the training process, and the anonymous RSS of its
    DataLoader workers together (they are forked anew each epoch)."""
    fields = _status(pid)
    workers = 0
    for child in _children(pid):
        try:
            workers += _status(child)["RssAnon"]
        except (FileNotFoundError, ProcessLookupError, KeyError):  # a worker that just ended
            pass
    return {"rss_mib": fields["VmRSS"] // 1024, "rss_anon_mib": fields["RssAnon"] // 1024,
            "rss_file_mib": fields["RssFile"] // 1024, "workers_rss_anon_mib": workers // 1024,
            "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10000, help="train rows")
    parser.add_argument("--corrupt-fraction", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=200)
    parser.add_argument("--save-total-limit", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="at_scale_"))
    data_dir, run_dir = work / "data", work / "run"
    start = time.perf_counter()
    write_synthetic_dataset(data_dir, n=round(args.rows / 0.8), seed=0, image_size=128)
    generated = time.perf_counter() - start
    expected = plant(data_dir, args.corrupt_fraction, seed=0)
    train_rows = pq.read_metadata(data_dir / "train-00000.parquet").num_rows
    steps = -(-train_rows // args.batch_size)  # one epoch
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump({"training_args": {
        "dataloader_num_workers": args.workers, "logging_steps": 50, "save_total_limit": args.save_total_limit,
        "disable_tqdm": True}}))
    command = [sys.executable, "-m", "regionmed_clip.training_scripts.train", "--preset", "tiny", "--data", str(data_dir),
               "--output-dir", str(run_dir), "--max-steps", str(steps), "--save-steps", str(args.save_steps),
               "--batch-size", str(args.batch_size), "--config", str(config),
               "--max-skip-fraction", str(min(0.99, 2 * args.corrupt_fraction))]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = work / "train.log"
    samples = []
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        train_start = time.perf_counter()
        while process.poll() is None:
            try:
                samples.append({"seconds": round(time.perf_counter() - train_start), **process_stats(process.pid)})
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                pass
            time.sleep(5)
    trained = time.perf_counter() - train_start
    lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()] \
        if (run_dir / "train_log.jsonl").exists() else []
    last = lines[-1] if lines else {}
    counted = {reason: count for reason, count in (last.get("skip_reasons") or {}).items()}
    # Training proper: after start-up (model, data, workers) and, with workers, while they run (the
    # end of the run saves, exports and plots in the training process alone).
    training = [sample for sample in samples if not args.workers or sample["workers_rss_anon_mib"] > 0]
    steady = training[len(training) // 10:] or samples
    figures = {
        "cpu": cpu_model(),
        "train_rows": train_rows,
        "steps": steps,
        "returncode": process.returncode,
        "generate_seconds": round(generated),
        "train_seconds": round(trained),
        "rows_seen": last.get("rows_seen"),
        "planted": expected,
        "counted": counted,
        "counts_match": counted == expected,
        "checkpoints": (checkpoints := sorted(path.name for path in run_dir.glob("checkpoint-*"))),
        "checkpoints_within_limit": len(checkpoints) <= args.save_total_limit,
        "process": {"start": steady[0] if steady else None, "middle": steady[len(steady) // 2] if steady else None,
                    "end": steady[-1] if steady else None,
                    "max_rss_anon_mib": max((sample["rss_anon_mib"] for sample in steady), default=None)},
        "samples_every_5_s": {"rss_anon_mib": [sample["rss_anon_mib"] for sample in samples],
                              "workers_rss_anon_mib": [sample["workers_rss_anon_mib"] for sample in samples],
                              "open_fds": [sample["open_fds"] for sample in samples]},
        "work_dir": str(work),
    }
    print(json.dumps(figures, indent=1))
    write_report(figures, args.output)


if __name__ == "__main__":
    main()
