"""The JSON report every benchmark writes (its figures, the command that made them, the machine), and
the process-memory probes the memory benchmarks share (Linux `/proc`)."""

import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from regionmed_clip.training_scripts.heap import release_free_heap

__all__ = ["cpu_model", "proc_status_bytes", "release_free_heap", "reset_peak_rss", "write_report"]


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


def proc_status_bytes(field: str, pid: int | str = "self") -> int:
    """A `/proc/PID/status` memory field (VmRSS, VmHWM) in bytes, of this process by default."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
