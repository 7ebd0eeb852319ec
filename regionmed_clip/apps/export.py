"""`regionmed-export`: a trained model folder -> a folder ready for the Hugging Face Hub.

    regionmed-export --model RUN/final --output HUBDIR [--eval-results OUT/results.json ...]
                     [--repo-id ORG/NAME] [--model-name NAME] [--license apache-2.0] [--benchmarks MAP.yaml]
                     [--space SPACEDIR]

HUBDIR holds `config.json` (with `auto_map` for AutoConfig, AutoModel,
AutoModelForZeroShotImageClassification, AutoModelForVisualQuestionAnswering, AutoProcessor and
AutoImageProcessor), `model.safetensors` and nothing pickled, the flat remote-code files, the
processor and tokenizer files, and `README.md`: the model card rendered from `model_card.md` by
`huggingface_hub.ModelCard` with its metadata (licence, tags, pipeline tag, library, the
evaluation results as `model-index`), the training data and procedure read from the run folder,
and the evaluation table from the results files. Results of benchmarks registered on the Hub are
also written as `.eval_results/<task>.yaml` (`EvalResultEntry`); which of our (task, dataset)
pairs is which Hub benchmark comes from `HUB_BENCHMARKS` or `--benchmarks`, and a result with no
registered benchmark is skipped with a note (no medical benchmark is registered today).

Every input is checked before a file is written (a bad argument exits 2, a bad file 1, each on one
line naming it), and HUBDIR is written as a hidden folder beside it, renamed only once complete. A
run config without a `data` section gives a card that says the training data was not recorded.
`--space SPACEDIR` (with `--repo-id`) also writes a Space folder for the demo app (`apps/space.py`).
"""

import argparse
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, EvalResultEntry, ModelCard, ModelCardData, eval_result_entries_to_yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoProcessor

from regionmed_clip.apps.space import SPACE_FILES, space_files
from regionmed_clip.cli import UsageError, console_script
from regionmed_clip.data.schema import dataset_output, read_provenance
from regionmed_clip.evaluation.results import load_results, markdown_report
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPModel
from regionmed_clip.processing import RegionMedCLIPProcessor
from regionmed_clip.processing.tokenization_regionmed_clip import without_token_type_ids
from regionmed_clip.training_scripts.schedule import StagedSchedule

__all__ = [
    "AUTO_MAP",
    "CARD_TEMPLATE",
    "CUSTOM_PIPELINES",
    "HUB_BENCHMARKS",
    "HUB_TASK_TYPES",
    "PICKLE_SUFFIXES",
    "check_repo_id",
    "eval_result_entries",
    "export_model",
    "main",
    "model_index_results",
]

CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "model_card.md"
# Every auto class the exported folder answers to, and the class behind it.
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_regionmed_clip.RegionMedCLIPConfig",
    "AutoModel": "modeling_regionmed_clip.RegionMedCLIPModel",
    "AutoModelForZeroShotImageClassification": "modeling_regionmed_clip.RegionMedCLIPModel",
    "AutoModelForVisualQuestionAnswering": "modeling_regionmed_clip_vqa.RegionMedCLIPForVQA",
}
# `pipeline("zero-shot-image-classification", model=HUBDIR, trust_remote_code=True)` builds ours.
CUSTOM_PIPELINES: dict[str, dict[str, Any]] = {
    "zero-shot-image-classification": {
        "impl": "pipeline_regionmed_clip.RegionMedCLIPZeroShotPipeline",
        "pt": ["AutoModelForZeroShotImageClassification"],
        "type": "multimodal",
    },
}
# Our task names -> the Hub task types of `model-index`.
HUB_TASK_TYPES: dict[str, tuple[str, str]] = {
    "zero-shot": ("zero-shot-image-classification", "Zero-shot image classification"),
    "region": ("zero-shot-image-classification", "Region-level zero-shot classification"),
    "grounding": ("zero-shot-object-detection", "Phrase grounding"),
    "retrieval": ("image-feature-extraction", "Image-text retrieval"),
    "vqa": ("visual-question-answering", "Visual question answering"),
}
# (task, dataset name) -> (Hub benchmark dataset id, task id) for `.eval_results/`: empty, because no
# medical-imaging benchmark is registered on the Hub today. `--benchmarks` adds entries.
HUB_BENCHMARKS: dict[tuple[str, str], tuple[str, str]] = {}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_VQA_MODULE = "modeling_regionmed_clip_vqa.py"
_PIPELINE_MODULE = "pipeline_regionmed_clip.py"
_BENCHMARK_KEYS = ("task", "dataset", "hub_dataset_id", "hub_task_id")


def check_repo_id(repo_id: str, flag: str = "--repo-id") -> str:
    """`repo_id` if it is a valid Hub model id ORG/NAME; else a UsageError naming `flag`."""
    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it must have exactly one '/'")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{flag} must be ORG/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}: "
                         f"{str(error).splitlines()[0]}") from None
    return repo_id


def model_index_results(records: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    """One `EvalResult` per headline figure of each results record (the legacy `model-index`)."""
    results = []
    for record in records:
        if record["task"] not in HUB_TASK_TYPES:
            raise ValueError(f"results of task {record['task']!r} have no Hub task type "
                             f"(known tasks: {', '.join(HUB_TASK_TYPES)})")
        task_type, task_name = HUB_TASK_TYPES[record["task"]]
        dataset = record["dataset"]
        for name, entry in record["headline"].items():
            if entry.get("value") is None:
                continue
            results.append(EvalResult(
                task_type=task_type, task_name=task_name, dataset_type=dataset["name"], dataset_name=dataset["name"],
                dataset_split=dataset["split"], dataset_revision=dataset.get("revision"),
                metric_type=f"{record['task']}/{name}", metric_name=f"{task_name}: {name}",
                metric_value=round(float(entry["value"]), 4)))
    return results


def eval_result_entries(
    records: Sequence[Mapping[str, Any]], benchmarks: Mapping[tuple[str, str], tuple[str, str]]
) -> tuple[dict[str, list[EvalResultEntry]], list[str]]:
    """`({task: [EvalResultEntry]}, notes)`: the first headline figure of every record whose (task,
    dataset name) is a registered Hub benchmark; a note for each record that is not."""
    entries: dict[str, list[EvalResultEntry]] = {}
    notes = []
    for record in records:
        key = (record["task"], record["dataset"]["name"])
        headline = next(iter(record["headline"].items()), None)
        if key not in benchmarks or headline is None or headline[1].get("value") is None:
            notes.append(f"{record['task']} on {record['dataset']['name']!r}: no Hub benchmark registered, "
                         "left out of .eval_results/")
            continue
        dataset_id, task_id = benchmarks[key]
        entries.setdefault(record["task"], []).append(EvalResultEntry(
            dataset_id=dataset_id, task_id=task_id, value=round(float(headline[1]["value"]), 4), date=record["date"],
            notes=f"{headline[0]} on split {record['dataset']['split']}; command: {record['command']}"))
    return entries, notes


def _load_record(path: str | Path) -> dict[str, Any]:
    """A results file (`evaluation.results.load_results`) checked for what the export reads from it;
    errors name the file, the field and (for a task export does not know) the known tasks."""
    record = load_results(path)
    where = str(Path(path) / "results.json" if Path(path).is_dir() else path)
    if record["task"] not in HUB_TASK_TYPES:
        raise ValueError(f"{where!r}: task {record['task']!r} is not one regionmed-export knows "
                         f"(known tasks: {', '.join(HUB_TASK_TYPES)})")
    dataset = record["dataset"]
    if not isinstance(dataset, dict) or any(not isinstance(dataset.get(key), str) for key in ("name", "split")):
        raise ValueError(f"{where!r}: field 'dataset' must be a mapping with string 'name' and 'split'")
    headline = record["headline"]
    if not isinstance(headline, dict) or any(
            not isinstance(entry, dict) or isinstance(entry.get("value"), bool)
            or not isinstance(entry.get("value"), (int, float, type(None))) for entry in headline.values()):
        raise ValueError(f"{where!r}: field 'headline' must map each figure to {{'value': number or null, ...}}")
    if not isinstance(record["model"], dict) or not isinstance(record["model"].get("path"), str):
        raise ValueError(f"{where!r}: field 'model' must be a mapping with a string 'path'")
    if not isinstance(record["settings"], dict):
        raise ValueError(f"{where!r}: field 'settings' must be a mapping")
    return record


def _load_benchmarks(path: Path | None) -> dict[tuple[str, str], tuple[str, str]]:
    """`HUB_BENCHMARKS` plus a YAML list of `{task, dataset, hub_dataset_id, hub_task_id}`."""
    benchmarks = dict(HUB_BENCHMARKS)
    if path is None:
        return benchmarks
    if not path.is_file():
        raise FileNotFoundError(f"--benchmarks {str(path)!r}: no such file")
    items = _read_yaml(path, "--benchmarks")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise ValueError(f"--benchmarks {str(path)!r} must hold a YAML list of mappings with string fields "
                         f"{list(_BENCHMARK_KEYS)}, got a {type(items).__name__}")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or any(not isinstance(item.get(key), str) for key in _BENCHMARK_KEYS):
            raise ValueError(f"--benchmarks {str(path)!r} item {index} must be a mapping with string fields "
                             f"{list(_BENCHMARK_KEYS)}")
        if item["task"] not in HUB_TASK_TYPES:
            raise ValueError(f"--benchmarks {str(path)!r} item {index}: task {item['task']!r} is not one "
                             f"regionmed-export knows (known tasks: {', '.join(HUB_TASK_TYPES)})")
        benchmarks[(item["task"], item["dataset"])] = (item["hub_dataset_id"], item["hub_task_id"])
    return benchmarks


def _read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a file that does not parse is a ValueError naming it and where."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: "
                         f"{getattr(error, 'problem', None) or type(error).__name__}{where}") from None


def _training_sections(model_dir: Path) -> tuple[str, str, list[str]]:
    """(training data, training procedure, warnings) from the run folder above `model_dir`
    (`run_config.yaml`, `train_log.jsonl`), or a plain statement of what is unknown. A run config that
    does not parse is an error naming it; one without a `data` section gives a card that says the
    training data was not recorded (and a warning), never a guess."""
    run_config = model_dir.parent / "run_config.yaml"
    if not run_config.is_file():
        unknown = "Not recorded: this folder was not exported from a `regionmed-train` run folder."
        return unknown, unknown, []
    config = _read_yaml(run_config, "run config")
    if not isinstance(config, dict):
        raise ValueError(f"run config {str(run_config)!r} must hold a YAML mapping, got a {type(config).__name__}")
    for section in ("model", "data", "training_args"):
        if not isinstance(config.get(section, {}), dict):
            raise ValueError(f"run config {str(run_config)!r}: section {section!r} must be a mapping")
    args = config.get("training_args", {})
    stages = "not recorded"
    if config.get("schedule") and isinstance(args.get("max_steps"), int) and args["max_steps"] > 0:
        try:  # a name or a list of stages, each with a fraction or a step count
            schedule = StagedSchedule(config["schedule"], args["max_steps"])
        except ValueError as error:
            raise ValueError(f"run config {str(run_config)!r}: {error}") from None
        stages = ", ".join(f"{stage.name} (steps {stage.start}-{min(stage.end, schedule.max_steps) - 1})"
                           for stage in schedule.stages if stage.start < schedule.max_steps)
    warnings = []
    data_config = config.get("data", {})
    if not isinstance(data_config.get("path"), str):
        data = f"Not recorded: `{run_config.name}` of the run folder has no `data.path`."
        warnings.append(f"run config {str(run_config)!r} has no 'data' section with a 'path': the model card "
                        "says the training data was not recorded")
    else:
        data = _training_data(Path(data_config["path"]), str(data_config.get("split", "train")), warnings)
    runtime = _train_runtime(model_dir.parent / "train_log.jsonl")
    procedure = (f"Preset `{config.get('model', {}).get('preset')}`, {args.get('max_steps')} steps of batch "
                 f"{args.get('per_device_train_batch_size')} at learning rate {args.get('learning_rate')} "
                 f"({args.get('lr_scheduler_type')}), seed {args.get('seed')}; stages: {stages}"
                 + (f"; {runtime / 60:.1f} minutes" if runtime else "") + ".")
    return data, procedure, warnings


def _training_data(data_path: Path, split: str, warnings: list[str]) -> str:
    """The card's training-data paragraph for the dataset folder the run config names."""
    if not data_path.is_dir():
        warnings.append(f"the training data {str(data_path)!r} named by the run config is not on this machine: "
                        "the model card gives its name only")
        return (f"`{data_path.name}` (split `{split}` used for training); the dataset was not available at export, "
                "so its size and provenance are not stated here.")
    counts = _split_counts(data_path)
    data = (f"`{data_path.name}` ({', '.join(f'{name}: {count} images' for name, count in counts.items()) or 'sizes unknown'}; "
            f"split `{split}` used for training)")
    try:
        provenance = read_provenance(data_path)
    except ValueError as error:
        raise ValueError(f"{str(data_path / 'provenance.json')!r} (the training data's provenance) is not valid "
                         f"JSON: {error}") from error
    if not isinstance(provenance, dict) or not isinstance(provenance.get("real_patient_data"), bool) \
            or not isinstance(provenance.get("source"), str):
        if provenance is None:
            data += ". Where the data came from was not recorded (a dataset written before `provenance.json`)."
        else:
            warnings.append(f"{str(data_path / 'provenance.json')!r} lacks 'source' / 'real_patient_data': the model "
                            "card says the data's origin is not known")
            data += ". Where the data came from is not known (its `provenance.json` does not say)."
    elif not provenance["real_patient_data"]:
        data += (f", made by `{provenance['source']}` (seed {provenance.get('seed')}): procedural chest films with "
                 "lesions, rule-written reports and region captions. **No real patient data**: the figures "
                 "below say nothing about real radiographs.")
    else:
        data += f", converted from the `{provenance['source']}` release ({provenance.get('input')})."
    return data


def _split_counts(data_path: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for shard in sorted(data_path.glob("*-*.parquet")):
        split = shard.name.split("-")[0]
        try:
            rows = pq.read_metadata(shard).num_rows
        except (OSError, ValueError) as error:
            raise ValueError(f"training data shard {str(shard)!r} is not a readable parquet file: {error}") from error
        counts[split] = counts.get(split, 0) + rows
    return counts


def _train_runtime(log: Path) -> float | None:
    """The run's `train_runtime`; None when the log is absent or lacks it (a line cut short by a killed
    run is skipped: the runtime is optional on the card)."""
    if not log.is_file():
        return None
    for line in reversed(log.read_text().splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("train_runtime"), (int, float)):
            return float(entry["train_runtime"])
    return None


def _check_output(output_dir: Path, flag: str = "--output") -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{flag} {str(output_dir)!r} is an existing file: export into a new folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise UsageError(f"{flag} {str(output_dir)!r} is not empty: export into a new folder")


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise UsageError(f"--model {str(model_dir)!r} is not a folder")
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {str(model_dir)!r} is not a saved model folder (it has no config.json)")


def _load_model(model_dir: Path) -> tuple[RegionMedCLIPModel, Any]:
    """The model and processor of `model_dir`; a folder they do not load from is a ValueError naming it."""
    try:
        model = RegionMedCLIPModel.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--model {str(model_dir)!r}: the model does not load: {error}") from error
    try:
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--model {str(model_dir)!r}: the processor / tokenizer files do not load "
                         f"(save the processor beside the model): {error}") from error
    return model, processor


def export_model(
    model_dir: str | Path,
    output_dir: str | Path,
    eval_results: Sequence[str | Path] = (),
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",
    benchmarks_path: str | Path | None = None,
    card_template: str | Path = CARD_TEMPLATE,
    space_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the Hub folder, and with `space_dir` a Space folder for the demo app on `repo_id` (`apps.space`);
    returns `{"output", "files", "notes", "warnings"}` (and `"space"`, `"space_files"`).

    Every input is checked before anything is written: a UsageError names a bad argument (an output
    that is a file or a folder that is not empty, a model path that is no model folder, a bad repo id),
    a ValueError / OSError the file that is wrong. The files are written into a hidden folder beside
    `output_dir`, renamed to it only once complete: a failed export leaves no folder behind."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    _check_output(output_dir)
    _check_model_dir(model_dir)
    if repo_id is not None:
        check_repo_id(repo_id)
    if space_dir is not None:
        space_dir = Path(space_dir)
        if repo_id is None:
            raise UsageError("--space needs --repo-id: the model repo (ORG/NAME) the Space's app loads")
        _check_output(space_dir, "--space")
        if space_dir.resolve() == output_dir.resolve():
            raise UsageError("--space must be another folder than --output (a Space is a repo of its own)")
    records = [_load_record(path) for path in eval_results]
    benchmarks = _load_benchmarks(Path(benchmarks_path) if benchmarks_path else None)
    training_data, training_procedure, warnings = _training_sections(model_dir)
    model, processor = _load_model(model_dir)
    without_token_type_ids(processor.tokenizer)  # folders saved before that was the default
    name = model_name or (repo_id.split("/")[-1] if repo_id else output_dir.name)
    with dataset_output(output_dir) as staging:
        notes = _write_hub_folder(staging, model, processor, records, benchmarks, name, repo_id, license,
                                  training_data, training_procedure, Path(card_template))
    files = sorted(path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*") if path.is_file())
    summary = {"output": str(output_dir), "files": files, "notes": notes, "warnings": warnings}
    if space_dir is not None:
        with dataset_output(space_dir) as staging:
            for file_name, text in space_files(repo_id, license, name).items():
                (staging / file_name).write_text(text)
        summary.update(space=str(space_dir), space_files=sorted(SPACE_FILES))
    return summary


def _write_hub_folder(
    output_dir: Path, model: RegionMedCLIPModel, processor: Any, records: Sequence[Mapping[str, Any]],
    benchmarks: Mapping[tuple[str, str], tuple[str, str]], name: str, repo_id: str | None, license: str,
    training_data: str, training_procedure: str, card_template: Path,
) -> list[str]:
    """Write every file of the Hub folder into `output_dir`; returns the notes on results left out."""
    model.save_pretrained(output_dir)  # safetensors, auto_map, and the remote-code files the model imports
    processor.save_pretrained(output_dir)
    for module, module_file in ((RegionMedCLIPModel.__module__, _VQA_MODULE),
                                (RegionMedCLIPProcessor.__module__, _PIPELINE_MODULE)):
        shutil.copy2(Path(sys.modules[module].__file__).with_name(module_file), output_dir / module_file)
    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
    config["custom_pipelines"] = CUSTOM_PIPELINES
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    card_data = ModelCardData(
        model_name=name, license=license, library_name="transformers", pipeline_tag="zero-shot-image-classification",
        tags=["medical-imaging", "vision-language", "clip", "region-aware", "custom_code", "not-for-clinical-use"],
        eval_results=model_index_results(records) or None)
    vision, text = model.config.vision_config, model.config.text_config
    card = ModelCard.from_template(
        card_data, template_path=str(card_template), model_name=name, repo_id=repo_id or f"<org>/{name}",
        projection_dim=model.config.projection_dim, image_size=vision.image_size, roi_size=model.config.roi_image_size,
        max_rois=model.config.max_rois, max_text_length=text.max_position_embeddings,
        parameters=f"{model.num_parameters():,}", training_data=training_data, training_procedure=training_procedure,
        evaluation_results=markdown_report(records) if records else "No evaluation results were given to the export.")
    card.save(output_dir / "README.md")

    entries, notes = eval_result_entries(records, benchmarks)
    for task, task_entries in entries.items():
        path = output_dir / ".eval_results" / f"{task}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(eval_result_entries_to_yaml(task_entries), sort_keys=False))
    pickles = [path.name for path in output_dir.rglob("*") if path.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(f"the export holds pickled files {pickles}: only safetensors may ship")
    return notes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="trained model folder (e.g. RUN/final)")
    parser.add_argument("--output", type=Path, required=True, help="new folder for the Hub files")
    parser.add_argument("--eval-results", type=Path, nargs="*", default=[], help="regionmed-eval results.json files")
    parser.add_argument("--repo-id", default=None, help="ORG/NAME, used in the card's usage snippet")
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--benchmarks", type=Path, default=None,
                        help="YAML list of {task, dataset, hub_dataset_id, hub_task_id}: results for .eval_results/")
    parser.add_argument("--space", type=Path, default=None,
                        help="also write a Hugging Face Space folder for the demo app on --repo-id (new folder)")
    return parser


@console_script("regionmed-export")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    summary = export_model(args.model, args.output, args.eval_results, args.repo_id, args.model_name,
                           args.license, args.benchmarks, space_dir=args.space)
    for warning in summary["warnings"]:
        print(f"regionmed-export: warning: {warning}", file=sys.stderr)
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"exported {len(summary['files'])} files to {summary['output']}")
    if "space" in summary:
        print(f"wrote the Space ({', '.join(summary['space_files'])}) to {summary['space']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
