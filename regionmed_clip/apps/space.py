"""A Hugging Face Space folder for the demo app: written by `regionmed-export --space`, checked by
`regionmed-push --space`.

The folder holds `app.py` (a few lines calling `regionmed_clip.apps.app.launch` on the model repo),
`requirements.txt` (this package, with its `app` extra, pinned to the version that wrote it) and
`README.md` whose YAML header is the Space's configuration (sdk gradio at the installed Gradio's version,
app_file, the model in `models:`, licence, the not-for-clinical-use tag).
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.repocard import metadata_load

__all__ = ["PACKAGE", "SPACE_FILES", "SpaceFolderError", "check_space_folder", "space_files"]

PACKAGE = "regionmed-clip"
SPACE_FILES = ("README.md", "app.py", "requirements.txt")
_REQUIRED_METADATA = ("sdk", "sdk_version", "app_file", "models", "license")


class SpaceFolderError(ValueError):
    """The Space folder is not ready to publish; the message names the file and what is wrong."""


def _installed(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        raise SpaceFolderError(f"{distribution} is not installed: a Space's requirements pin the installed "
                               "version; install it (pip install -e '.[app]')") from None


def space_files(repo_id: str, license: str, title: str) -> dict[str, str]:
    """The text of each Space file for the model repo `repo_id` (ORG/NAME)."""
    header = {"title": title, "emoji": "🩻", "colorFrom": "blue", "colorTo": "gray", "sdk": "gradio",
              "sdk_version": _installed("gradio"), "app_file": "app.py", "pinned": False, "license": license,
              "models": [repo_id], "tags": ["medical-imaging", "region-aware", "zero-shot", "not-for-clinical-use"],
              "short_description": "Findings of a radiograph, with and without boxes"}
    readme = (f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n# {title}\n\n"
              f"The demo of [{repo_id}](https://huggingface.co/{repo_id}): drop a radiograph (PNG, JPEG, 16-bit TIFF "
              "or DICOM), optionally draw boxes on it, and press Analyse. It shows the box-free score of each finding "
              "with a heatmap of where it is, and for each box its findings and the nearest region caption.\n\n"
              "**Research use only. Not for clinical use:** the model is not a medical device and its outputs are "
              "not diagnoses.\n")
    app = ('"""The Space\'s entry point: the package\'s app on the model repo."""\n\n'
           "from regionmed_clip.apps.app import launch\n\n"
           f'launch({repo_id!r}, host="0.0.0.0", port=7860, title={title!r})\n')
    requirements = f"{PACKAGE}[app]=={_installed(PACKAGE)}\n"
    return {"README.md": readme, "app.py": app, "requirements.txt": requirements}


def check_space_folder(folder: str | Path) -> dict[str, Any]:
    """Validate a Space folder offline; returns `{"files", "bytes", "models"}` or raises `SpaceFolderError`
    naming the file that is wrong."""
    folder = Path(folder)
    missing = [name for name in SPACE_FILES if not (folder / name).is_file()]
    if missing:
        raise SpaceFolderError(f"{folder} lacks {missing} (write it with regionmed-export --space)")
    try:
        metadata = metadata_load(folder / "README.md")  # the YAML header, None without one
    except (yaml.YAMLError, ValueError, TypeError) as error:
        raise SpaceFolderError(f"{folder}/README.md: the Space configuration does not parse: "
                               f"{getattr(error, 'problem', None) or str(error).splitlines()[0]}") from None
    if not metadata:
        raise SpaceFolderError(f"{folder}/README.md has no YAML header (the Space configuration)")
    absent = [name for name in _REQUIRED_METADATA if not metadata.get(name)]
    if absent:
        raise SpaceFolderError(f"{folder}/README.md: the Space configuration lacks {absent}")
    if metadata["sdk"] != "gradio" or not (folder / metadata["app_file"]).is_file():
        raise SpaceFolderError(f"{folder}/README.md: expected sdk gradio and an app_file in the folder, got sdk "
                               f"{metadata['sdk']!r}, app_file {metadata['app_file']!r}")
    requirements = (folder / "requirements.txt").read_text().split()
    if not any(line.startswith(f"{PACKAGE}[app]==") for line in requirements):
        raise SpaceFolderError(f"{folder}/requirements.txt must pin {PACKAGE}[app]==VERSION, got {requirements}")
    source = (folder / "app.py").read_text()
    try:
        compile(source, str(folder / "app.py"), "exec")
    except SyntaxError as error:
        raise SpaceFolderError(f"{folder}/app.py does not compile: {error}") from None
    unused = [model for model in metadata["models"] if repr(model) not in source]
    if unused:
        raise SpaceFolderError(f"{folder}/app.py does not load the model(s) {unused} that README.md's models: names")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return {"files": [path.relative_to(folder).as_posix() for path in files],
            "bytes": sum(path.stat().st_size for path in files), "models": list(metadata["models"])}
