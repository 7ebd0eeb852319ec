"""`regionmed-push`: check an exported folder and publish it to the Hugging Face Hub.

    regionmed-push HUBDIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--dry-run]

Before anything is uploaded the folder is checked offline: `config.json` maps every auto class
of `training_scripts.export.AUTO_MAP`, the weights are safetensors and nothing is pickled, the
model card loads with `huggingface_hub.ModelCard` and carries a licence, pipeline tag and library
name, its `model-index` parses back into evaluation results, and every `.eval_results/*.yaml`
parses with `parse_eval_result_entries`. `--dry-run` stops there and lists the files. Otherwise
`HfApi.create_repo` (existing repos are kept) and `upload_folder` publish it; the token is the
usual one (`HF_TOKEN` or `hf auth login`'s cache) and is never printed.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, ModelCard, parse_eval_result_entries

from regionmed_cli import console_script
from training_scripts.export import AUTO_MAP, PICKLE_SUFFIXES

__all__ = ["HubFolderError", "check_hub_folder", "main", "push_folder"]

_REQUIRED_CARD_FIELDS = ("license", "pipeline_tag", "library_name")


class HubFolderError(ValueError):
    """The folder is not ready to publish; the message names the file and what is wrong."""


def check_hub_folder(folder: str | Path) -> dict[str, Any]:
    """Validate an exported folder offline; returns `{"files", "bytes", "model_index_results",
    "eval_result_entries"}` or raises `HubFolderError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubFolderError(f"{str(folder)!r} is not a folder")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    names = [path.relative_to(folder).as_posix() for path in files]
    pickles = [name for name in names if Path(name).suffix in PICKLE_SUFFIXES]
    if pickles:
        raise HubFolderError(f"pickled files would be published: {pickles}; only safetensors may ship")
    if not any(name.endswith(".safetensors") for name in names):
        raise HubFolderError(f"{str(folder)!r} has no .safetensors weights")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise HubFolderError(f"config.json: {error}") from None
    missing = sorted(set(AUTO_MAP) - set(config.get("auto_map", {})))
    if missing:
        raise HubFolderError(f"config.json: auto_map lacks {missing} (export with regionmed-export)")
    for reference in config["auto_map"].values():
        module = reference.split(".")[0] if isinstance(reference, str) else None
        if module and not (folder / f"{module}.py").is_file():
            raise HubFolderError(f"config.json: auto_map names {reference!r} but {module}.py is not in the folder")
    if not (folder / "README.md").is_file():
        raise HubFolderError("README.md (the model card) is missing")
    card = ModelCard.load(folder / "README.md")
    absent = [field for field in _REQUIRED_CARD_FIELDS if not getattr(card.data, field, None)]
    if absent:
        raise HubFolderError(f"README.md: the card metadata lacks {absent}")
    if "model-index" in card.content and not card.data.eval_results:
        raise HubFolderError("README.md: model-index does not parse back into evaluation results")
    entries = 0
    for path in sorted((folder / ".eval_results").glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text())
            entries += len(parse_eval_result_entries(data if isinstance(data, list) else []))
        except (yaml.YAMLError, KeyError, TypeError, ValueError) as error:
            raise HubFolderError(f".eval_results/{path.name}: {error}") from None
        if not isinstance(data, list) or not data:
            raise HubFolderError(f".eval_results/{path.name}: expected a non-empty list of results")
    return {"files": names, "bytes": sum(path.stat().st_size for path in files),
            "model_index_results": len(card.data.eval_results or []), "eval_result_entries": entries}


def push_folder(
    folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
    api: HfApi | None = None,
) -> dict[str, Any]:
    """Check `folder`, then (unless `dry_run`) create the repo if needed and upload the folder.
    Returns the check's summary plus `"url"` (the commit URL) when uploaded."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubFolderError(f"--repo-id must be ORG/NAME, got {repo_id!r}")
    summary = check_hub_folder(folder)
    if dry_run:
        return summary
    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                               commit_message="Upload RegionMed-CLIP (regionmed-push)")
    return {**summary, "url": str(getattr(commit, "commit_url", commit))}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder written by regionmed-export")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    parser.add_argument("--dry-run", action="store_true", help="check and list the files; upload nothing")
    return parser


@console_script("regionmed-push")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = push_folder(args.folder, args.repo_id, args.private, args.revision, args.dry_run)
    except HubFolderError as error:
        print(f"regionmed-push: error: {error}", file=sys.stderr)
        return 2
    for name in summary["files"]:
        print(f"  {name}")
    print(f"{len(summary['files'])} files, {summary['bytes'] / 2**20:.1f} MiB; model-index results: "
          f"{summary['model_index_results']}; .eval_results entries: {summary['eval_result_entries']}")
    print("dry run: nothing uploaded" if args.dry_run else f"uploaded: {summary['url']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
