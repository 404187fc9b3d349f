"""What every ``kflow`` command shares: connection options, logging set-up, JSON arguments, errors.

Expected failures (a bad argument, a missing file, an invalid definition, an unreachable broker,
a module that does not import) end the command with exactly one ``error: ...`` line on stderr and
a non-zero exit code. Anything else is a bug and keeps its traceback.

Long-running commands (:data:`SERVICE_COMMANDS`) log at ``KFLOW_LOG_LEVEL`` (INFO); the others print
their result and log only warnings unless ``-v`` or an explicit ``KFLOW_LOG_LEVEL`` asks for more.
When neither ``--bootstrap`` nor ``KFLOW_BOOTSTRAP`` is given and a ``kflow dev`` stack runs in the
current folder (its ``.kflow/dev.json``), commands use that stack and say so in one line.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from kflow.model.errors import KflowError

__all__ = ["EXIT_ERROR", "SERVICE_COMMANDS", "Bootstrap", "KflowGroup", "ModuleImportError", "Prefix", "Verbose",
           "current_folder_on_path", "fail", "import_modules", "parse_json", "setup_logging"]

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
#: Commands that run until stopped and log as services (JSON lines off a terminal) at KFLOW_LOG_LEVEL.
SERVICE_COMMANDS = frozenset({"engine", "worker", "dev", "connect", "triggers", "visibility", "devices", "subscriptions"})
# Whether the command being run is one of SERVICE_COMMANDS (library use counts as a service).
_SERVICE: ContextVar[bool] = ContextVar("kflow_service_command", default=True)
#: Commands that never use a running dev stack's file (``dev`` writes it; ``bench`` starts its own).
_NO_DEV_FILE = frozenset({"dev", "bench"})


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
    verbose = verbose or _ROOT_VERBOSE.get()
    level = logging.DEBUG if verbose else logging.getLevelName(telemetry.log_level)
    if not verbose and not _SERVICE.get() and "log_level" not in telemetry.model_fields_set:
        level = max(level, logging.WARNING)  # a command that prints its result does not log it again
    # librdkafka's own lines (see KafkaConfig.client_conf): a failing one-shot command says what
    # went wrong in its ``error:`` line, so its client chatter shows only with -v.
    logging.getLogger("kflow.kafka").setLevel(logging.NOTSET if verbose or _SERVICE.get() else logging.CRITICAL)
    root = logging.getLogger()
    if not any(getattr(h, "_kflow", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(make_formatter(telemetry.log_format, sys.stderr))
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    if level == logging.DEBUG or root.level in (logging.NOTSET, logging.WARNING):
        root.setLevel(level)
    logging.getLogger("kflow").setLevel(level)


class ModuleImportError(KflowError):
    """A user module failed to import; ``cause`` is what its import raised."""

    def __init__(self, module: str, cause: BaseException, where: str = "") -> None:
        self.module, self.cause = module, cause
        detail = " ".join((str(cause) or type(cause).__name__).split())
        if isinstance(cause, ModuleNotFoundError) and cause.name == module:
            text = f"cannot import module '{module}': no module named '{module}' (searched the current folder " \
                   f"{os.getcwd()} and the installed packages)"
        else:
            text = f"cannot import module '{module}': {type(cause).__name__}: {detail}"
            if where:
                text += f" ({where})"
        super().__init__(text)


def current_folder_on_path() -> None:
    """Put the current folder first on ``sys.path``, as ``python -m`` does, so local modules import."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()


def _user_frame(exc: BaseException) -> str:
    """``file:line`` of the innermost traceback frame outside the import machinery, or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    if not frames or frames[-1].filename == __file__:
        return ""
    return f"{frames[-1].filename}, line {frames[-1].lineno}"


def import_modules(names: list[str]) -> list[ModuleType]:
    """Import each module (``a.b``; comma-separated lists are split), the current folder on ``sys.path``.

    Raises:
        ModuleImportError: a module failed to import; the message carries what its import raised
            (the missing module's name, or the exception raised inside the module and where).
    """
    current_folder_on_path()
    out = []
    for name in (n.strip() for item in names for n in item.split(",")):
        if not name:
            continue
        try:
            out.append(importlib.import_module(name))
        except Exception as exc:  # anything a user module raises while importing is reported, with its cause
            raise ModuleImportError(name, exc, _user_frame(exc)) from exc
    return out


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
        # the subcommand's name and arguments (click keeps the name apart until it is resolved)
        args = [*(getattr(ctx, "_protected_args", None) or []), *ctx.args]
        command = args[0] if args else ""
        service = _SERVICE.set(command in SERVICE_COMMANDS)
        try:
            with _dev_stack_env(command, args[1:]):
                return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (``kflow ... | head``): nothing left to tell it.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_ERROR) from None
        except EXPECTED_ERRORS as exc:
            logging.getLogger("kflow.cli").debug("command failed", exc_info=True)
            fail(describe(exc))
        finally:
            _SERVICE.reset(service)
            _ROOT_VERBOSE.reset(token)


def _gives_bootstrap(args: list[str]) -> bool:
    """Whether the command line or the environment names the brokers."""
    for arg in args:
        if arg == "--":
            break
        if arg in ("-b", "--bootstrap") or arg.startswith("--bootstrap=") or (arg.startswith("-b") and arg[2:3] != "-"):
            return True
    return "KFLOW_BOOTSTRAP" in os.environ


@contextmanager
def _dev_stack_env(command: str, args: list[str]) -> Iterator[None]:
    """Point the command at the dev stack of the current folder when no bootstrap is given.

    The stack's address, prefix and partition count become ``KFLOW_*`` defaults for the duration
    of the command (variables already set win); ``--help`` and the commands of
    ``_NO_DEV_FILE`` never look.
    """
    if command in _NO_DEV_FILE or not command or "--help" in args or _gives_bootstrap(args):
        yield
        return
    from kflow.config import read_dev_file

    dev = read_dev_file()
    if dev is None:
        yield
        return
    values = dev.environ()
    added = {k: v for k, v in values.items() if k not in os.environ}
    typer.echo(f"using the dev stack at {dev.bootstrap} (topics {dev.prefix}*, {dev.partitions} partitions; "
               f"from {dev.path})", err=True)
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


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
