"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) for the installed release.

The release's sdist on the package registry ships `tests/test_modeling_common.py` and
`tests/test_configuration_common.py` (Apache-2.0, licence header kept), so the first use downloads
it with pip (the registry is the one network source allowed) and keeps the two files, with the
sdist's LICENSE, in a cache keyed by the version: `$REGIONMED_TEST_CACHE` or
`~/.cache/regionmed-clip`. The sdist lacks three modules those files import; they are provided as:

- `exporters/test_export.py`: `ExportTesterMixin`, empty. Its torch.export tests do not run, for
  CLIPModel as for us (`ModelTesterMixin` inherits it).
- `generation/test_utils.py`: `GenerationTesterMixin`, empty; only generative models' testers
  inherit it, and its only other use is an `issubclass` check.
- `utils/test_configuration_utils.py`: `config_common_kwargs`, copied from transformers v5's
  `tests/utils/test_configuration_utils.py` (the fields every `PreTrainedConfig` takes, at
  non-default values).
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

PACKAGE = "transformers_common_tests"
COMMON_TEST_FILES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py", "LICENSE")
# Markers the common tests use; registered so that `--strict-markers` accepts them.
COMMON_TEST_MARKERS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                       "torch_compile_test")

_MISSING_MODULES = {
    "exporters/test_export.py": '''"""Stand-in: the sdist does not ship tests/exporters (torch.export tests)."""


class ExportTesterMixin:
    pass
''',
    "generation/test_utils.py": '''"""Stand-in: the sdist does not ship tests/generation (generate tests, generative models only)."""


class GenerationTesterMixin:
    pass
''',
    "utils/test_configuration_utils.py": '''"""`config_common_kwargs` from transformers v5 tests/utils/test_configuration_utils.py (Apache-2.0,
Copyright 2019 HuggingFace Inc.), which the sdist does not ship."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
}


def cache_root() -> Path:
    base = Path(os.environ.get("REGIONMED_TEST_CACHE", Path.home() / ".cache" / "regionmed-clip"))
    return base / f"transformers-{transformers.__version__}-tests"


def _download_sdist(into: Path) -> Path:
    version = transformers.__version__
    command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
               "--no-deps", "--no-build-isolation", "--quiet", "--dest", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not archives:
        raise RuntimeError(
            f"could not fetch transformers {version}'s sdist for its common model tests: `{' '.join(command)}` "
            f"exited {result.returncode}:\n{result.stderr.strip()}\nRun it where the package registry is reachable, "
            f"or set REGIONMED_TEST_CACHE to a folder holding {cache_root().name}/{PACKAGE}."
        )
    return archives[0]


def _build_package(target: Path) -> None:
    """Extract the common test files into `target` (a package) and add the stand-in modules."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = _download_sdist(Path(scratch))
        staging = Path(scratch) / PACKAGE
        staging.mkdir()
        prefix = f"transformers-{transformers.__version__}/"
        with tarfile.open(archive) as sdist:
            for member in COMMON_TEST_FILES:
                source = sdist.extractfile(prefix + member)
                if source is None:
                    raise RuntimeError(f"{archive.name} holds no {member}")
                (staging / Path(member).name).write_bytes(source.read())
        for relative, text in {"__init__.py": "", **_MISSING_MODULES}.items():
            path = staging / relative
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A finished package appears in one rename: an interrupted fetch never leaves half of one.
        partial = target.parent / f".{PACKAGE}.partial-{os.getpid()}"
        shutil.copytree(staging, partial)
        try:
            partial.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(partial)


def common_test_modules() -> tuple[ModuleType, ModuleType]:
    """`(test_modeling_common, test_configuration_common)` of the installed transformers."""
    root = cache_root()
    if not (root / PACKAGE / "test_modeling_common.py").exists():
        _build_package(root / PACKAGE)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"))
