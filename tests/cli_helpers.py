"""Running console scripts as a user does, and checking what a user sees when one fails."""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


def console_script_path(name: str) -> str:
    """The installed console script `name` (beside this interpreter first, as in the venv)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"console script {name!r} is not installed (pip install -e .)")
    return found


def run_console_script(name: str, args: Sequence[str], cwd: Path, timeout: float = 900,
                       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `name args` in a subprocess with stdin closed (a prompt fails) and offline."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    full_env.pop("REGIONMED_DEBUG", None)
    return subprocess.run([console_script_path(name), *args], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_exit(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"rc {result.returncode}\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    assert "[y/N]" not in output, output[-4000:]


def run_failing(main: Callable[[list[str] | None], int], argv: Sequence[str], capsys: pytest.CaptureFixture,
                expected_rc: int, *names: str) -> str:
    """Run a console script's `main` in process on bad input and return its stderr, asserting that it
    exits with `expected_rc` on one error line (no traceback) that names each of `names`."""
    try:
        rc = main(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        rc = exit_.code
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert rc == expected_rc, f"rc {rc} (expected {expected_rc}) for {list(argv)}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert "internal error" not in output, output[-3000:]
    error_lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert error_lines, f"no error line for {list(argv)}:\n{output[-3000:]}"
    for name in names:
        assert name in error_lines[-1], f"{name!r} not named in {error_lines[-1]!r}"
    return error_lines[-1]
