"""`regionmed-export`: a trained model folder -> a folder ready for the Hugging Face Hub.

    regionmed-export --model RUN/final --output HUBDIR [--eval-results OUT/results.json ...]
                     [--repo-id ORG/NAME] [--model-name NAME] [--license apache-2.0] [--benchmarks MAP.yaml]

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
from transformers import AutoProcessor

from evaluation.results import load_results, markdown_report
from modeling_regionmed_clip import RegionMedCLIPModel
from processing import RegionMedCLIPProcessor
from processing.tokenization_regionmed_clip import without_token_type_ids
from regionmed_cli import console_script
from training_scripts.data_schema import read_provenance

__all__ = [
    "AUTO_MAP",
    "CARD_TEMPLATE",
    "CUSTOM_PIPELINES",
    "HUB_BENCHMARKS",
    "HUB_TASK_TYPES",
    "PICKLE_SUFFIXES",
    "eval_result_entries",
    "export_model",
    "main",
    "model_index_results",
]

CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_card.md"
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


def model_index_results(records: Sequence[Mapping[str, Any]]) -> list[EvalResult]:
    """One `EvalResult` per headline figure of each results record (the legacy `model-index`)."""
    results = []
    for record in records:
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


def _load_benchmarks(path: Path | None) -> dict[tuple[str, str], tuple[str, str]]:
    """`HUB_BENCHMARKS` plus a YAML list of `{task, dataset, hub_dataset_id, hub_task_id}`."""
    benchmarks = dict(HUB_BENCHMARKS)
    if path is None:
        return benchmarks
    items = yaml.safe_load(path.read_text()) or []
    for index, item in enumerate(items if isinstance(items, list) else [None]):
        keys = ("task", "dataset", "hub_dataset_id", "hub_task_id")
        if not isinstance(item, dict) or any(not isinstance(item.get(key), str) for key in keys):
            raise ValueError(f"{path.name}[{index}] must be a mapping with string fields {list(keys)}")
        benchmarks[(item["task"], item["dataset"])] = (item["hub_dataset_id"], item["hub_task_id"])
    return benchmarks


def _training_sections(model_dir: Path) -> tuple[str, str]:
    """(training data, training procedure) from the run folder above `model_dir`
    (`run_config.yaml`, `train_log.jsonl`), or a plain statement that they are unknown."""
    run_config = model_dir.parent / "run_config.yaml"
    if not run_config.is_file():
        unknown = "Not recorded: this folder was not exported from a `regionmed-train` run folder."
        return unknown, unknown
    config = yaml.safe_load(run_config.read_text())
    data_path = Path(config["data"]["path"])
    counts = _split_counts(data_path)
    data = (f"`{data_path.name}` ({', '.join(f'{split}: {count} images' for split, count in counts.items()) or 'sizes unknown'}; "
            f"split `{config['data'].get('split', 'train')}` used for training)")
    provenance = read_provenance(data_path)
    if provenance is None:
        data += ". Where the data came from was not recorded (a dataset written before `provenance.json`)."
    elif not provenance["real_patient_data"]:
        data += (f", made by `{provenance['source']}` (seed {provenance.get('seed')}): procedural chest films with "
                 "lesions, rule-written reports and region captions. **No real patient data**: the figures "
                 "below say nothing about real radiographs.")
    else:
        data += f", converted from the `{provenance['source']}` release ({provenance.get('input')})."
    args = config.get("training_args", {})
    stages = ", ".join(f"{stage['name']} ({stage['fraction']:.0%} of the steps)" for stage in config.get("schedule", []))
    runtime = _train_runtime(model_dir.parent / "train_log.jsonl")
    procedure = (f"Preset `{config['model'].get('preset')}`, {args.get('max_steps')} steps of batch "
                 f"{args.get('per_device_train_batch_size')} at learning rate {args.get('learning_rate')} "
                 f"({args.get('lr_scheduler_type')}), seed {args.get('seed')}; stages: {stages}"
                 + (f"; {runtime / 60:.1f} minutes" if runtime else "") + ".")
    return data, procedure


def _split_counts(data_path: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for shard in sorted(data_path.glob("*-*.parquet")):
        split = shard.name.split("-")[0]
        counts[split] = counts.get(split, 0) + pq.read_metadata(shard).num_rows
    return counts


def _train_runtime(log: Path) -> float | None:
    if not log.is_file():
        return None
    for line in reversed(log.read_text().splitlines()):
        entry = json.loads(line)
        if "train_runtime" in entry:
            return float(entry["train_runtime"])
    return None


def export_model(
    model_dir: str | Path,
    output_dir: str | Path,
    eval_results: Sequence[str | Path] = (),
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",
    benchmarks_path: str | Path | None = None,
    card_template: str | Path = CARD_TEMPLATE,
) -> dict[str, Any]:
    """Write the Hub folder; returns `{"output", "files", "notes"}`. Raises ValueError naming what is
    wrong (an output folder that is not empty, a results file that is not one, a pickle in the output)."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"--output {str(output_dir)!r} is not empty: export into a new folder")
    records = [load_results(path) for path in eval_results]
    benchmarks = _load_benchmarks(Path(benchmarks_path) if benchmarks_path else None)
    model = RegionMedCLIPModel.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    without_token_type_ids(processor.tokenizer)  # folders saved before that was the default
    model.save_pretrained(output_dir)  # safetensors, auto_map, and the remote-code files the model imports
    processor.save_pretrained(output_dir)
    for module, name in ((RegionMedCLIPModel.__module__, _VQA_MODULE), (RegionMedCLIPProcessor.__module__, _PIPELINE_MODULE)):
        shutil.copy2(Path(sys.modules[module].__file__).with_name(name), output_dir / name)
    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
    config["custom_pipelines"] = CUSTOM_PIPELINES
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    training_data, training_procedure = _training_sections(model_dir)
    name = model_name or (repo_id.split("/")[-1] if repo_id else output_dir.name)
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
    files = sorted(path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*") if path.is_file())
    return {"output": str(output_dir), "files": files, "notes": notes}


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
    return parser


@console_script("regionmed-export")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"regionmed-export: error: --model {str(args.model)!r} is not a saved model folder", file=sys.stderr)
        return 2
    try:
        summary = export_model(args.model, args.output, args.eval_results, args.repo_id, args.model_name,
                               args.license, args.benchmarks)
    except (FileNotFoundError, ValueError) as error:
        print(f"regionmed-export: error: {error}", file=sys.stderr)
        return 2
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"exported {len(summary['files'])} files to {summary['output']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
