"""The `memplan` command: a thin Typer shell over the library. Errors become one line on stderr + exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import typer

from memplan.errors import ExitCode, MemplanError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Will it fit? Peak-VRAM prediction for LLM fine-tuning: estimate one configuration, fit "
                       "a GPU, trace the real model exactly, probe, tune, and run with OOM recovery.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"memplan {version('memplan')}")
        raise typer.Exit(0)


@app.callback()
def _top(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,  # noqa: B008
                                      help="print memplan's version and exit")) -> None:
    """Will it fit? Peak-VRAM prediction for LLM fine-tuning."""


def _register() -> None:
    from memplan.cli import estimate_cmd, fit_cmd, lists, probe_cmd, run_cmd  # noqa: F401 - registers commands


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None,
                  line: str | None = None) -> None:
    """memplan's own warnings are one line on stderr; other packages' keep Python's format."""
    if f"{os.sep}memplan{os.sep}" in filename and issubclass(category, UserWarning):
        print(f"memplan: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, mapping MemplanError to one line + its exit code (tracebacks with --debug)."""
    _register()
    args = list(sys.argv[1:] if argv is None else argv)
    ours = args[: args.index("--")] if "--" in args else args  # what follows -- belongs to `memplan run`'s command
    debug = "--debug" in ours
    if debug:
        args.remove("--debug")
    global _fast_exit
    _fast_exit = args[:1] in (["estimate"], ["trace"]) or args[:1] == ["fit"] and "--probe" not in ours  # print only
    with _guards() as terminated:
        rc = _dispatch(args, debug)
    if terminated:  # Ctrl-C's 130 (typer's Exit(130) too) becomes 143 when the signal was SIGTERM
        return 128 + terminated[0]
    return rc


def _dispatch(args: list[str], debug: bool) -> int:
    try:
        rc = app(args=args, standalone_mode=False)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (timeout, scancel, systemd, Kubernetes): children stopped
        return 128 + signal.SIGINT
    except MemplanError as err:
        if debug:
            traceback.print_exc()
        print(f"memplan: error: {err}", file=sys.stderr)
        return int(err.exit_code)
    except SystemExit as exc:  # typer.Exit inside commands
        return int(exc.code or 0)
    except Exception as err:  # usage errors of typer's vendored click (bad option, missing value)
        if type(err).__name__ == "Abort":  # click's wrapper of a KeyboardInterrupt
            return 128 + signal.SIGINT
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            if debug:
                traceback.print_exc()
            if err.format_message():  # no_args_is_help has printed the help: nothing to add
                print(f"memplan: error: {err.format_message()}", file=sys.stderr)
            return int(ExitCode.BAD_INPUT)
        raise
    return int(rc) if isinstance(rc, int) else 0


@contextlib.contextmanager
def _guards() -> Iterator[list[int]]:
    """For one command: SIGTERM unwinds like Ctrl-C (yields the signals received), memplan's warnings are one
    line, a closed stdout is not an error. Everything is put back afterwards (the library may run in-process)."""
    terminated: list[int] = []
    previous = (warnings.showwarning, sys.stdout)
    warnings.showwarning = _show_warning
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, lambda signum, _: terminated.append(signum) or _interrupt())
    with contextlib.suppress(OSError, ValueError, AttributeError):  # captured output (tests): nothing to guard
        sys.stdout.fileno()
        sys.stdout = _PipeSafe(sys.stdout)
    try:
        yield terminated
    finally:
        warnings.showwarning, sys.stdout = previous
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


_fast_exit = False


class _PipeSafe:
    """stdout that a closed reader (`memplan fit --json | head -1`) does not turn into exit 1: once the pipe is
    gone, the rest goes to /dev/null (Python's recommended handling) and the command keeps its exit status."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def _closed(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C: every `finally` runs, so probes, ranks and trainings are stopped and reaped."""
    raise KeyboardInterrupt


def run() -> None:
    code = main()
    if _fast_exit and "torch" in sys.modules:
        # Tearing down an interpreter that imported torch + transformers takes ~2 s (measured: half the time
        # of a 7B trace); estimate and fit have printed everything and closed their files, so skip it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
