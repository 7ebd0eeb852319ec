"""`regionmed-push`: check an exported folder and publish it to the Hugging Face Hub.

    regionmed-push HUBDIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--dry-run]
    regionmed-push SPACEDIR --space --repo-id ORG/SPACE [--dry-run]

Before anything is uploaded the folder is checked offline: `config.json` maps every auto class
of `regionmed_clip.apps.export.AUTO_MAP`, the weights are safetensors and nothing is pickled, the
model card loads with `huggingface_hub.ModelCard` and carries a licence, pipeline tag and library
name, its `model-index` parses back into evaluation results, and every `.eval_results/*.yaml`
parses with `parse_eval_result_entries`. `--dry-run` stops there and lists the files. Otherwise
`HfApi.create_repo` (existing repos are kept) and `upload_folder` publish it; the token is the
usual one (`HF_TOKEN` or `hf auth login`'s cache) and is never printed. Offline
(`HF_HUB_OFFLINE=1`), without a token, or when the Hub cannot be reached or refuses, the command
ends with one line saying so (`HubUploadError`). With `--space` the folder is a Space written by
`regionmed-export --space`, checked by `apps.space.check_space_folder` and created as a Gradio Space.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, ModelCard, constants, get_token, parse_eval_result_entries
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

from regionmed_clip.apps.export import AUTO_MAP, PICKLE_SUFFIXES, check_repo_id
from regionmed_clip.apps.space import SpaceFolderError, check_space_folder
from regionmed_clip.cli import UsageError, console_script

try:  # the HTTP library under huggingface_hub: its base error is also a network failure's
    from httpx2 import HTTPError as _HTTPError  # huggingface_hub >= 2
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    from httpx import HTTPError as _HTTPError

__all__ = ["HubFolderError", "HubUploadError", "SpaceFolderError", "check_hub_folder", "main", "push_folder"]

_REQUIRED_CARD_FIELDS = ("license", "pipeline_tag", "library_name")


class HubFolderError(ValueError):
    """The folder is not ready to publish; the message names the file and what is wrong."""


class HubUploadError(OSError):
    """The upload could not be done (offline, no token, the Hub unreachable or refusing); the message
    says why and what to do."""


OFFLINE_MESSAGE = "offline (HF_HUB_OFFLINE=1): cannot upload; use --dry-run to check the folder without uploading"
NO_TOKEN_MESSAGE = "no token: run `hf auth login` or set HF_TOKEN (a token with write access)"


def check_hub_folder(folder: str | Path) -> dict[str, Any]:
    """Validate an exported folder offline; returns `{"files", "bytes", "model_index_results",
    "eval_result_entries"}` or raises `HubFolderError` naming the folder's file that is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubFolderError(f"{str(folder)!r} is not a folder")
    where = str(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    names = [path.relative_to(folder).as_posix() for path in files]
    pickles = [name for name in names if Path(name).suffix in PICKLE_SUFFIXES]
    if pickles:
        raise HubFolderError(f"{where}: pickled files would be published: {pickles}; only safetensors may ship")
    if not any(name.endswith(".safetensors") for name in names):
        raise HubFolderError(f"{where} has no .safetensors weights (is it a folder written by regionmed-export?)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise HubFolderError(f"{where}/config.json is missing (export with regionmed-export)") from None
    except ValueError as error:
        raise HubFolderError(f"{where}/config.json is not valid JSON: {error}") from None
    auto_map = config.get("auto_map", {}) if isinstance(config, dict) else None
    if not isinstance(auto_map, dict):
        raise HubFolderError(f"{where}/config.json: must be a JSON object with an 'auto_map' mapping")
    missing = sorted(set(AUTO_MAP) - set(auto_map))
    if missing:
        raise HubFolderError(f"{where}/config.json: auto_map lacks {missing} (export with regionmed-export)")
    for reference in auto_map.values():
        module = reference.split(".")[0] if isinstance(reference, str) else None
        if module and not (folder / f"{module}.py").is_file():
            raise HubFolderError(f"{where}/config.json: auto_map names {reference!r} but {module}.py is not in "
                                 "the folder")
    if not (folder / "README.md").is_file():
        raise HubFolderError(f"{where}/README.md (the model card) is missing")
    try:
        card = ModelCard.load(folder / "README.md")
    except (yaml.YAMLError, ValueError, TypeError) as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise HubFolderError(f"{where}/README.md: the card metadata does not parse: {problem}") from None
    absent = [field for field in _REQUIRED_CARD_FIELDS if not getattr(card.data, field, None)]
    if absent:
        raise HubFolderError(f"{where}/README.md: the card metadata lacks {absent}")
    if "model-index" in card.content and not card.data.eval_results:
        raise HubFolderError(f"{where}/README.md: model-index does not parse back into evaluation results")
    entries = 0
    for path in sorted((folder / ".eval_results").glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text())
            entries += len(parse_eval_result_entries(data if isinstance(data, list) else []))
        except (yaml.YAMLError, KeyError, TypeError, ValueError) as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise HubFolderError(f"{where}/.eval_results/{path.name}: {problem}") from None
        if not isinstance(data, list) or not data:
            raise HubFolderError(f"{where}/.eval_results/{path.name}: expected a non-empty list of results")
    return {"files": names, "bytes": sum(path.stat().st_size for path in files),
            "model_index_results": len(card.data.eval_results or []), "eval_result_entries": entries}


def push_folder(
    folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
    api: HfApi | None = None, space: bool = False,
) -> dict[str, Any]:
    """Check `folder` (a model folder, or with `space` a Space folder), then (unless `dry_run`) create the repo if
    needed and upload the folder. Returns the check's summary plus `"url"` (the commit URL) when uploaded. Raises
    UsageError for a bad repo id or a folder argument that is no folder, HubFolderError (SpaceFolderError) for a
    folder not ready to publish and HubUploadError when the upload cannot be done."""
    check_repo_id(repo_id)
    if not Path(folder).is_dir():
        raise UsageError(f"folder {str(folder)!r} is not a folder (give the folder regionmed-export wrote)")
    summary = check_space_folder(folder) if space else check_hub_folder(folder)
    if dry_run:
        return summary
    return {**summary, "url": _upload(folder, repo_id, private, revision, api, "space" if space else "model")}


def _upload(folder: str | Path, repo_id: str, private: bool, revision: str | None, api: HfApi | None,
            repo_type: str = "model") -> str:
    """Create the repo (kept if it exists), the branch, and upload; the Hub's failures become one
    `HubUploadError` line each (offline, no token, refused, unreachable)."""
    if api is None:
        if constants.HF_HUB_OFFLINE:  # every request would raise OfflineModeIsEnabled
            raise HubUploadError(OFFLINE_MESSAGE)
        api = HfApi()
        if api.token is None and get_token() is None:
            raise HubUploadError(NO_TOKEN_MESSAGE)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type,
                        space_sdk="gradio" if repo_type == "space" else None)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, repo_type=repo_type,
                                   commit_message="Upload RegionMed-CLIP (regionmed-push)")
    except OfflineModeIsEnabled as error:
        raise HubUploadError(OFFLINE_MESSAGE) from error
    except LocalTokenNotFoundError as error:
        raise HubUploadError(NO_TOKEN_MESSAGE) from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            raise HubUploadError(f"the Hub refused the token (401) for {repo_id!r}: run `hf auth login` or set "
                                 "HF_TOKEN to a valid token") from error
        if status == 403:
            raise HubUploadError(f"the token may not write to {repo_id!r} (403): use a token with write access "
                                 "to that namespace") from error
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise HubUploadError(f"upload to {repo_id!r} failed: {first_line}") from error
    except _HTTPError as error:  # no response at all: DNS, connection, timeout
        raise HubUploadError(f"cannot reach the Hub to upload to {repo_id!r} ({type(error).__name__}: {error}); "
                             "check the network, or use --dry-run") from error
    return str(getattr(commit, "commit_url", commit))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder written by regionmed-export")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    parser.add_argument("--dry-run", action="store_true", help="check and list the files; upload nothing")
    parser.add_argument("--space", action="store_true",
                        help="the folder is a Space (regionmed-export --space): push it as a Gradio Space")
    return parser


@console_script("regionmed-push")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    summary = push_folder(args.folder, args.repo_id, args.private, args.revision, args.dry_run, space=args.space)
    for name in summary["files"]:
        print(f"  {name}")
    if args.space:
        print(f"{len(summary['files'])} files, a Gradio Space of the model(s) {summary['models']}")
    else:
        print(f"{len(summary['files'])} files, {summary['bytes'] / 2**20:.1f} MiB; model-index results: "
              f"{summary['model_index_results']}; .eval_results entries: {summary['eval_result_entries']}")
    print("dry run: nothing uploaded" if args.dry_run else f"uploaded: {summary['url']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
