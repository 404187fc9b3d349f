"""What every ``kflow`` command shares: connection options, logging set-up, JSON arguments, errors.

Expected failures (a bad argument, a missing file, an invalid definition, an unreachable broker,
a module that does not import) end the command with exactly one ``error: ...`` line on stderr and
a non-zero exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from kflow.model.errors import KflowError

__all__ = ["EXIT_ERROR", "Bootstrap", "KflowGroup", "Prefix", "Verbose", "fail", "parse_json", "setup_logging"]

EXIT_ERROR = 1

Bootstrap = Annotated[
    Optional[str],
    typer.Option("--bootstrap", "-b", envvar="KFLOW_BOOTSTRAP", show_envvar=True, metavar="HOST:PORT",
                 help="Kafka bootstrap servers."),
]
Prefix = Annotated[
    Optional[str],
    typer.Option("--prefix", envvar="KFLOW_TOPIC_PREFIX", show_envvar=True, metavar="PREFIX",
                 help="Topic prefix (default 'kflow.')."),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level.")]

#: Failures a user can fix; they are reported in one line, without a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (KflowError, ValueError, OSError, ImportError)

_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
# ``kflow -v CMD`` and ``kflow CMD -v`` both mean DEBUG: the group's flag is kept for the command.
_ROOT_VERBOSE: ContextVar[bool] = ContextVar("kflow_root_verbose", default=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap it per command)."""

    _kflow = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """``KFLOW_LOG_LEVEL`` (DEBUG with ``verbose``) to stderr as ``KFLOW_LOG_FORMAT`` (see :mod:`kflow._log`); idempotent."""
    from kflow._log import ContextFilter, make_formatter
    from kflow.config import TelemetryConfig, load_config

    telemetry = load_config(TelemetryConfig)
    level = logging.DEBUG if verbose or _ROOT_VERBOSE.get() else logging.getLevelName(telemetry.log_level)
    root = logging.getLogger()
    if not any(getattr(h, "_kflow", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(make_formatter(telemetry.log_format, sys.stderr))
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    if level == logging.DEBUG or root.level in (logging.NOTSET, logging.WARNING):
        root.setLevel(level)
    logging.getLogger("kflow").setLevel(level)


def describe(exc: BaseException) -> str:
    """One line for an expected failure."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file: {exc.filename}"
    if isinstance(exc, IsADirectoryError) and exc.filename:
        return f"is a directory, not a file: {exc.filename}"
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"cannot import module '{exc.name}'" + ("" if str(exc).endswith(f"'{exc.name}'") else f": {exc}")
    if isinstance(exc, ImportError):
        return f"import failed: {exc}"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # multi-line messages (pydantic) become one line


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class KflowGroup(TyperGroup):
    """Turns expected failures of any command into one ``error:`` line and exit code 1."""

    def invoke(self, ctx: Any) -> Any:
        token = _ROOT_VERBOSE.set(bool(ctx.params.get("verbose")))
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (``kflow ... | head``): nothing left to tell it.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_ERROR) from None
        except EXPECTED_ERRORS as exc:
            logging.getLogger("kflow.cli").debug("command failed", exc_info=True)
            fail(describe(exc))
        finally:
            _ROOT_VERBOSE.reset(token)


def parse_json(text: str | None, option: str) -> Any:
    """Parse a JSON argument; ``@path`` reads the document from a file."""
    if text is None:
        return None
    source = option
    if text.startswith("@"):
        path = Path(text[1:])
        text = path.read_text(encoding="utf-8")
        source = f"{option} file {path}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def dump_json(value: Any) -> str:
    """A JSON value as one line of text."""
    return json.dumps(value, ensure_ascii=False)
