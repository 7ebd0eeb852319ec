"""`regionmed-demo`: the main job on the embedded default data, on CPU.

1. generates a fresh synthetic chest-film dataset (`regionmed-data synth`);
2. trains the default recipe (`regionmed-train --preset tiny`) and, beside it with the same steps,
   data and seed, the global-only ablation (`configs/global_only.yaml`): two processes, one
   thread each;
3. reloads both as a user would (`AutoModel` / `AutoProcessor` with `trust_remote_code`) and runs
   the probe (`regionmed-eval probe`) on the test split: box-free zero-shot AUROC and retrieval
   against the global-only ablation, and region hard-negative accuracy per kind with the controls
   (crops blanked, boxes mirrored, box geometry removed);
4. prints where the models, logs, loss plots and the probe report are.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

from evaluation.cli import format_report
from evaluation.probe import run_probe
from evaluation.results import to_json

from .launch import GLOBAL_ONLY_CONFIG, train_in_subprocesses
from .synthetic import write_synthetic_dataset

__all__ = ["main"]

# Both trainings together fit the 10-minute budget of `make demo` on 2 cores.
DEMO_STEPS = 450


def _train_both(data_dir: Path, output_dir: Path, max_steps: int, seed: int) -> dict[str, Path]:
    """Train the default recipe and the global-only ablation side by side; returns their run folders."""
    common = ["--preset", "tiny", "--data", str(data_dir), "--max-steps", str(max_steps), "--seed", str(seed),
              "--save-steps", str(max_steps), "--logging-steps", str(max(1, min(20, max_steps // 20)))]
    runs = {"run": common, "global_only": [*common, "--config", str(GLOBAL_ONLY_CONFIG)]}
    train_in_subprocesses({output_dir / name: args for name, args in runs.items()}, jobs=2)
    return {name: output_dir / name for name in runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regionmed-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--n", type=int, default=2000, help="synthetic images to generate")
    parser.add_argument("--max-steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data_dir = args.output_dir / "data"
    for name in ("data", "run", "global_only"):  # the demo always starts fresh
        shutil.rmtree(args.output_dir / name, ignore_errors=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    summary = write_synthetic_dataset(data_dir, n=args.n, seed=args.seed)
    print(f"[1/3] generated {summary['rows']} synthetic films in {summary['seconds']}s -> {data_dir}", flush=True)
    try:
        runs = _train_both(data_dir, args.output_dir, args.max_steps, args.seed)
    except RuntimeError as error:
        print(f"regionmed-demo: {error}", file=sys.stderr)
        return 1
    print(f"[2/3] trained the default recipe and the global-only ablation ({args.max_steps} steps each) "
          f"in {time.perf_counter() - start:.0f}s so far", flush=True)
    report = run_probe(runs["run"] / "final", data_dir, split="test", baseline_dir=runs["global_only"] / "final",
                       command=" ".join(["regionmed-demo", *(argv if argv is not None else sys.argv[1:])]))
    report_path = args.output_dir / "probe.json"
    report_path.write_text(to_json(report))
    print("[3/3] probe on the test split (regionmed-eval probe --baseline <global-only>):")
    print(format_report(report))
    print(f"\nmodel + processor (Hub remote code): {runs['run'] / 'final'}   global-only ablation: "
          f"{runs['global_only'] / 'final'}")
    print(f"loss curves: {runs['run'] / 'loss_curves.png'}   loss log: {runs['run'] / 'train_log.jsonl'}")
    print(f"probe report: {report_path}   total time: {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
