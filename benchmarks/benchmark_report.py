"""The JSON report every benchmark writes (its figures, the command that made them, the machine), and
the process-memory probes the memory benchmarks share (Linux `/proc`)."""

import argparse
import json
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from regionmed_clip.training_scripts.heap import release_free_heap

__all__ = ["cpu_model", "proc_status_bytes", "release_free_heap", "reset_peak_rss", "seed_parser", "seed_summary",
           "train_minutes", "write_report"]


def write_report(figures: dict[str, Any], output: Path | None) -> dict[str, Any]:
    """Prefix `figures` with the command line and machine facts; write it to `output` if given."""
    report = {
        "command": "python " + " ".join(shlex.quote(arg) for arg in sys.argv),
        "machine": {"python": platform.python_version(), "processor": platform.processor(), "system": platform.system()},
        **figures,
    }
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
    return report


def proc_status_bytes(field: str, pid: int | str = "self") -> int:
    """A `/proc/PID/status` memory field (VmRSS, VmHWM) in bytes, of this process by default."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# -- the seeded training benchmarks (bench_learning, bench_retention) ------------------------------------------


def seed_parser(description: str, runs_help: str, max_steps: int, max_steps_help: str | None = None
                ) -> argparse.ArgumentParser:
    """The arguments every seeded training benchmark takes: --data, --runs, --seeds, --max-steps, --jobs, --output."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="canonical dataset (regionmed-data synth)")
    parser.add_argument("--runs", type=Path, required=True, help=runs_help)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=max_steps, help=max_steps_help)
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (one thread each)")
    parser.add_argument("--output", type=Path, default=None)
    return parser


def train_minutes(run_dir: Path) -> float:
    """Training wall time of a run, from the Trainer's final log line."""
    for line in reversed((run_dir / "train_log.jsonl").read_text().splitlines()):
        entry = json.loads(line)
        if "train_runtime" in entry:
            return round(entry["train_runtime"] / 60, 2)
    return float("nan")


def seed_summary(per_seed: dict[Any, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`{"mean", "std"}` (population std) over the seeds of every numeric leaf figure that all seeds have, nested
    keys joined with dots."""
    def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(leaves(value, f"{prefix}{key}."))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[prefix + key] = float(value)
        return out

    flat = [leaves(figures) for figures in per_seed.values()]
    names = [name for name in flat[0] if all(name in seed for seed in flat)]
    return {"mean": {name: statistics.fmean(seed[name] for seed in flat) for name in names},
            "std": {name: statistics.pstdev([seed[name] for seed in flat]) for name in names}}
