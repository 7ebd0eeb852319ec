"""The console scripts' shared error boundary (stdlib only, below every other non-shipped layer).

Every `regionmed-*` command's `main` is wrapped by `console_script(prog)`: what escapes it becomes one
line on stderr and an exit code, never a raw traceback:

- `UsageError` (a bad argument value found after parsing) and argparse's own errors: exit 2;
- `ValueError` / `OSError` (bad input: a file, a row, a folder; their messages name it): exit 1;
- an exception with an integer `exit_code` attribute (an expected end, e.g. too many bad rows): that code;
- anything else is a bug: one line naming the exception, exit 1, and a hint to rerun with `--debug`;
- Ctrl-C: exit 130.

`--debug` anywhere on the command line (removed before the command parses it) or
`REGIONMED_DEBUG=1` in the environment lets the exception through with its traceback.
"""

import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEBUG_ENV", "DEBUG_FLAG", "UsageError", "console_script", "debug_requested", "exit_code_of", "folder",
           "fraction", "model_folder", "output_folder", "positive_int"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "REGIONMED_DEBUG"

# Exit codes as argparse and the shell use them.
EXIT_INPUT_ERROR = 1
EXIT_USAGE_ERROR = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A command-line argument whose value the command cannot use (exit code 2). Name the argument."""


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_code_of(error: Exception) -> int | None:
    """The exit code for an expected error: its own `exit_code` attribute (e.g. a run stopped for too
    many bad rows), 2 for a UsageError, 1 for bad input (ValueError, OSError); None for a bug."""
    if isinstance(getattr(error, "exit_code", None), int):
        return error.exit_code
    if isinstance(error, UsageError):
        return EXIT_USAGE_ERROR
    if isinstance(error, (ValueError, OSError)):
        return EXIT_INPUT_ERROR
    return None


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message keeps its lines, joined by ' | ')."""
    text = str(error).strip()
    if isinstance(error, KeyError) and error.args:
        text = f"missing key {error.args[0]!r}"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def console_script(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Wrap a console script's `main(argv) -> exit code` in the shared error boundary (see the module)."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            args = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(args)
            args = [arg for arg in args if arg != DEBUG_FLAG]
            if debug:
                return main(args)
            try:
                return main(args)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            except Exception as error:  # noqa: BLE001 - the boundary: a bug still gets one line, not a traceback
                code = exit_code_of(error)
                if code is None:
                    print(f"{prog}: internal error: {type(error).__name__}: {_one_line(error)} "
                          f"(a bug; rerun with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
                    return EXIT_INPUT_ERROR
                print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
                return code

        return run

    return wrap


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _parse(int, text, "an integer")
    if value < 1:
        raise _argparse_error(f"must be a positive integer, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = _parse(float, text, "a number")
    if not 0.0 <= value < 1.0:
        raise _argparse_error(f"must be in [0, 1), got {text!r}")
    return value


def folder(text: str) -> Path:
    """argparse type: an existing folder."""
    path = Path(text)
    if not path.is_dir():
        raise _argparse_error(f"{text!r} is not a folder" + ("" if path.exists() else " (it does not exist)"))
    return path


def model_folder(text: str) -> Path:
    """argparse type: a saved model folder (a folder holding config.json)."""
    path = folder(text)
    if not (path / "config.json").is_file():
        raise _argparse_error(f"{text!r} is not a saved model folder (it has no config.json)")
    return path


def output_folder(text: str) -> Path:
    """argparse type: a folder to write into, new or existing, but not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise _argparse_error(f"{text!r} is a file, not a folder")
    return path


def _parse(kind: Callable[[str], Any], text: str, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise _argparse_error(f"must be {what}, got {text!r}") from None


def _argparse_error(message: str) -> Exception:
    import argparse

    return argparse.ArgumentTypeError(message)
