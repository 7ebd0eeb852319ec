"""The JSON report every benchmark writes: its figures, the command that made them, the machine."""

import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


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
