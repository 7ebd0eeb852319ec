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

When the sdist cannot be fetched (no network, no cache), `common_test_modules` raises
`CommonTestsUnavailable`, and tests/test_transformers_common.py skips with its reason, except where
the suite is required (`suite_required`: in CI, i.e. `CI` set as CI services set it, or with
`REGIONMED_REQUIRE_TRANSFORMERS_SUITE=1`): there the failed fetch is a collection error.
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
REQUIRE_VARIABLE = "REGIONMED_REQUIRE_TRANSFORMERS_SUITE"
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


class CommonTestsUnavailable(RuntimeError):
    """transformers' common test files are neither cached nor fetchable here; `reason` says what failed
    and how to provide them, in one paragraph (the message adds pip's whole error output)."""

    def __init__(self, reason: str, details: str = ""):
        super().__init__(f"{reason}\n{details}" if details else reason)
        self.reason = reason


def cache_root() -> Path:
    base = Path(os.environ.get("REGIONMED_TEST_CACHE", Path.home() / ".cache" / "regionmed-clip"))
    return base / f"transformers-{transformers.__version__}-tests"


def suite_required() -> bool:
    """Whether a failed fetch must fail the run rather than skip the suite: `REGIONMED_REQUIRE_TRANSFORMERS_SUITE`
    when set (1 / 0), else whether `CI` is set (GitHub Actions, GitLab CI and most CI services set it)."""
    required = os.environ.get(REQUIRE_VARIABLE)
    if required is not None and required.strip():
        return required.strip().lower() not in ("0", "false", "no")
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _download_sdist(into: Path) -> Path:
    version = transformers.__version__
    command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
               "--no-deps", "--no-build-isolation", "--quiet", "--dest", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not archives:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else "no error output"
        raise CommonTestsUnavailable(
            f"transformers' common model tests (ModelTesterMixin, ConfigTester) NOT RUN: could not fetch "
            f"transformers {version}'s sdist, which ships them: `pip download transformers=={version} --no-binary "
            f":all:` exited {result.returncode} ({last}). To run them, run the tests once where the package index "
            f"is reachable (the files are then kept in {cache_root()}), or put the `{PACKAGE}` package built there "
            f"elsewhere into that folder (REGIONMED_TEST_CACHE chooses its parent). In CI (`CI` set) or with "
            f"{REQUIRE_VARIABLE}=1 this is an error, not a skip.",
            f"`{' '.join(command)}` said:\n{result.stderr.strip()}")
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
    """`(test_modeling_common, test_configuration_common)` of the installed transformers, fetched on the
    first use; `CommonTestsUnavailable` when they are not cached and cannot be fetched."""
    root = cache_root()
    if not (root / PACKAGE / "test_modeling_common.py").exists():
        _build_package(root / PACKAGE)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"))
