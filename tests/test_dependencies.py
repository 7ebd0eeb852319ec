"""Every third-party package the installed code imports is declared in setup.cfg.

The package folders are parsed (not imported, so an optional package that is absent is still seen): a
module-level import must be in ``install_requires``; an import inside a ``try:`` or a function (an optional
feature, imported lazily) may instead be in an extra. Import names become distribution names through
``importlib.metadata.packages_distributions()`` (``yaml`` -> ``PyYAML``); a package not installed here is
looked up under its import name.
"""

import ast
import configparser
import re
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The folders setup.cfg installs, evaluation/metrics/*/*.py (the scripts `evaluate` loads) included.
PACKAGE_FOLDERS = ("modeling_regionmed_clip", "processing", "training_scripts", "evaluation", "regionmed_clip")
OWN_NAMES = {"regionmed_clip"}

# Imported but deliberately not declared: the distribution that brings them in is declared instead.
PROVIDED_BY = {
    # regionmed_clip/apps/push.py catches the errors of huggingface_hub's HTTP client, httpx2 for
    # huggingface_hub >= 2 and httpx for 1.x; declaring either would install a client the Hub may not use.
    "httpx": "huggingface_hub",
    "httpx2": "huggingface_hub",
}


@dataclass(frozen=True)
class Import:
    """A top-level import name, where it is imported, and whether that import is optional (try / function)."""

    name: str
    where: str
    optional: bool


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.optional_depth = 0  # > 0 inside a try statement or a function body
        self.imports: list[Import] = []

    def _optional(self, node: ast.AST) -> None:
        self.optional_depth += 1
        self.generic_visit(node)
        self.optional_depth -= 1

    visit_Try = visit_TryStar = visit_FunctionDef = visit_AsyncFunctionDef = _optional

    def _add(self, module: str, node: ast.stmt) -> None:
        name = module.split(".")[0]
        if name not in sys.stdlib_module_names and name not in OWN_NAMES:
            self.imports.append(Import(name, f"{self.path}:{node.lineno}", self.optional_depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:  # relative imports are the package's own files
            self._add(node.module, node)


def third_party_imports() -> dict[str, list[Import]]:
    """Top-level import name -> every import of it in the package folders."""
    found: dict[str, list[Import]] = {}
    for folder in PACKAGE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            collector = _ImportCollector(str(path.relative_to(REPO)))
            collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
            for item in collector.imports:
                found.setdefault(item.name, []).append(item)
    return found


def normalize(distribution: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def requirement_names(lines: str) -> set[str]:
    """Normalised names of a setup.cfg requirement list (one PEP 508 requirement a line)."""
    names = set()
    for line in lines.splitlines():
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if match:
            names.add(normalize(match.group(1)))
    return names


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, {extra: its requirements}) of setup.cfg, as normalised names."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(REPO / "setup.cfg", encoding="utf-8")
    extras = {extra: requirement_names(value) for extra, value in config["options.extras_require"].items()}
    return requirement_names(config["options"]["install_requires"]), extras


@cache
def distributions(import_name: str) -> frozenset[str]:
    """The distributions that provide an import name (the name itself for a package not installed here)."""
    return frozenset(normalize(name) for name in _installed().get(import_name) or [import_name])


@cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()  # reads every installed distribution's file list: once


def label(import_name: str) -> str:
    """``yaml (distribution pyyaml)``, or just the name when the distribution has it too."""
    names = distributions(import_name)
    return import_name if names == {normalize(import_name)} else f"{import_name} (distribution {' or '.join(sorted(names))})"


IMPORTS = third_party_imports()


def test_the_scan_sees_the_imports():
    assert {"torch", "transformers", "numpy", "PIL", "evaluate", "pydicom", "xformers"} <= IMPORTS.keys()
    # evaluate's metric scripts are scanned too.
    assert any(item.where.startswith("evaluation/metrics/auroc/") for item in IMPORTS["evaluate"])


@pytest.mark.parametrize("name", sorted(IMPORTS.keys() - PROVIDED_BY.keys()))
def test_every_imported_package_is_declared(name):
    install_requires, extras = declared()
    provided_by = distributions(name)
    required = [item.where for item in IMPORTS[name] if not item.optional]
    if required:
        assert provided_by & install_requires, (
            f"{label(name)} is imported at module level ({', '.join(required)}) "
            "but is not in setup.cfg's install_requires"
        )
    else:
        in_extras = [extra for extra, names in extras.items() if provided_by & names]
        assert provided_by & install_requires or in_extras, (
            f"{label(name)} is imported lazily or in a try ({', '.join(item.where for item in IMPORTS[name])}) "
            "but is neither in setup.cfg's install_requires nor in an extra"
        )


@pytest.mark.parametrize(("name", "provider"), sorted(PROVIDED_BY.items()))
def test_undeclared_imports_are_still_imported_and_their_provider_declared(name, provider):
    assert name in IMPORTS, f"{name} is no longer imported: drop it from PROVIDED_BY"
    install_requires, _ = declared()
    assert distributions(provider) & install_requires, f"{provider}, which provides {name}, is not in install_requires"
