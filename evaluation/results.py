"""`results.json`: what every `regionmed-eval` task writes, and the markdown report that merges them.

A results file says exactly what was measured, so a number can be reproduced or refused:

    task          "zero-shot" | "region" | "grounding" | "retrieval" | "vqa"
    dataset       {"name", "path", "split", "files": [{"name", "bytes", "sha256"}], "revision"}
    n_examples    images (or questions, for VQA) scored
    metrics       the task's figures; every interval is {"low", "high"} (percentile bootstrap, 95%)
    headline      {figure name: {"value", "low", "high"}}: what `regionmed-eval report` tabulates
    prompts       the prompt texts used (zero-shot / region tasks), else null
    model         {"path", "config_sha256", "weights_sha256"}
    command       the command line;  versions  {python, torch, transformers, ...};  date  ISO 8601 UTC
    settings      the task's options (batch size, limit, device, policy, ...);  figures  PNG names
    rows          the rows used and skipped: {"rows_seen", "rows_used", "rows_skipped", "regions_skipped",
                  "reasons": {reason: count}, "examples": {reason: [row ids]}} (`evaluation.rows`); absent
                  from files written before rows were screened, so not among the required fields

Hashes identify the bytes: the same model and data files give the same hashes wherever they live.
"""

import datetime
import hashlib
import importlib.metadata
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regionmed_clip.data.fingerprints import file_sha256

from .rows import describe

__all__ = [
    "RESULTS_FILE",
    "RESULTS_FIELDS",
    "headline_entry",
    "load_results",
    "markdown_report",
    "model_fingerprint",
    "package_versions",
    "results_record",
    "to_json",
    "write_results",
]

RESULTS_FILE = "results.json"
RESULTS_FIELDS: tuple[str, ...] = (
    "task", "dataset", "n_examples", "metrics", "headline", "prompts", "model", "command", "versions", "date",
    "settings", "figures",
)
_PACKAGES = ("torch", "transformers", "datasets", "evaluate", "safetensors", "numpy", "regionmed-clip")


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """`{"path", "config_sha256", "weights_sha256"}`: the weights hash covers every `*.safetensors` file
    in name order (sharded checkpoints too)."""
    model_dir = Path(model_dir)
    weights = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    return {
        "path": str(model_dir.resolve()),
        "config_sha256": file_sha256(model_dir / "config.json"),
        "weights_sha256": weights.hexdigest(),
    }


def package_versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages a number depends on (None when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def headline_entry(value: float, interval: Mapping[str, float] | None = None) -> dict[str, float | None]:
    """`{"value", "low", "high"}` (the bounds None when there is no interval)."""
    interval = interval or {}
    return {"value": value, "low": interval.get("low"), "high": interval.get("high")}


def results_record(
    task: str,
    dataset: Mapping[str, Any],
    n_examples: int,
    metrics: Mapping[str, Any],
    headline: Mapping[str, Mapping[str, float | None]],
    model: Mapping[str, Any],
    command: str,
    settings: Mapping[str, Any],
    prompts: Mapping[str, Any] | None = None,
    figures: Sequence[str] = (),
    rows: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One task's results with every field of `RESULTS_FIELDS` (date and versions filled in here) and
    `rows` (what was skipped, `SkipLedger.to_dict()`)."""
    return {
        "task": task,
        "dataset": dict(dataset),
        "n_examples": n_examples,
        "metrics": dict(metrics),
        "headline": {name: dict(entry) for name, entry in headline.items()},
        "prompts": None if prompts is None else dict(prompts),
        "model": dict(model),
        "command": command,
        "versions": package_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": dict(settings),
        "figures": list(figures),
        "rows": None if rows is None else dict(rows),
    }


def _jsonable(value: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN); tuples -> lists; numpy scalars -> Python numbers."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value: Any) -> str:
    """Indented strict JSON of a report (NaN and inf become null)."""
    return json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n"


def write_results(output_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write `record` as `output_dir/results.json` (strict JSON: NaN becomes null) and return the path."""
    missing = [field for field in RESULTS_FIELDS if field not in record]
    if missing:
        raise ValueError(f"results record lacks the fields {missing}")
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(record))
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file, or `results.json` inside a folder; errors name the path and the problem."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {str(path)!r}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
    missing = [field for field in RESULTS_FIELDS if not isinstance(record, dict) or field not in record]
    if missing:
        raise ValueError(f"{str(path)!r} is not a regionmed-eval results file: it lacks {missing}")
    shapes = {"dataset": dict, "headline": dict, "model": dict, "settings": dict, "task": str}
    wrong = [field for field, kind in shapes.items() if not isinstance(record[field], kind)]
    wrong += [f"headline.{name}" for name, entry in (record["headline"] if isinstance(record["headline"], dict)
                                                     else {}).items()
              if not isinstance(entry, dict) or not all(value is None or _number(value) for value in entry.values())]
    if not wrong and not ({"name", "split"} <= set(record["dataset"]) and "path" in record["model"]):
        wrong = ["dataset.name / dataset.split / model.path"]
    if wrong:
        raise ValueError(f"{str(path)!r} is not a regionmed-eval results file: {wrong} malformed")
    return record


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None or entry.get("value") is None:
        return "n/a"
    value = entry["value"]
    digits = 1 if abs(value) > 1.0 else 3  # percentages (Recall@K) vs fractions (AUROC, accuracy)
    text = f"{value:.{digits}f}"
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"
    return text


def markdown_report(records: Sequence[Mapping[str, Any]], notes: bool = True) -> str:
    """One markdown table per task: a row per results file (model, with the boolean settings that are on,
    e.g. a control; dataset, split, n) and a column per headline figure, with its 95% interval; with
    `notes`, a line under the table for each result computed over fewer rows than its split holds
    (rows skipped or regions dropped, and why)."""
    if not records:
        raise ValueError("markdown_report needs at least one results record")
    sections = []
    for task in dict.fromkeys(record["task"] for record in records):
        rows = [record for record in records if record["task"] == task]
        figures = list(dict.fromkeys(name for record in rows for name in record["headline"]))
        header = ["model", "dataset", "split", "n", *figures]
        lines = [f"### {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        table_cells = []
        for record in rows:
            model_name = Path(record["model"]["path"]).name
            if model_name in ("final", "model"):  # a run folder's final/ says less than the run's name
                model_name = "/".join(Path(record["model"]["path"]).parts[-2:])
            switches = [name for name, value in record["settings"].items() if value is True]  # e.g. a control
            if switches:
                model_name += f" ({', '.join(switches)})"
            cells = [model_name, record["dataset"]["name"], record["dataset"]["split"], str(record["n_examples"]),
                     *(_cell(record["headline"].get(name)) for name in figures)]
            table_cells.append(cells)
            lines.append("| " + " | ".join(cells) + " |")
        skipped = [f"- {cells[0]}: {describe(record['rows'])}" for record, cells in zip(rows, table_cells, strict=True)
                   if isinstance(record.get("rows"), Mapping)
                   and (record["rows"].get("rows_skipped") or record["rows"].get("regions_skipped"))]
        if notes and skipped:
            lines += ["", "Figures over fewer rows than the split holds:", *skipped]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"
