"""The workflow sandbox: refuse wall clock, randomness, I/O and threads inside workflow code.

A code workflow must be a pure function of its history, so while the replayer steps workflow
code this module installs a per-thread profile hook (``sys.setprofile``) that raises
:class:`WorkflowSandboxError` when the code calls ``time.time``, ``datetime.now``, the module-level
``random`` functions, ``uuid.uuid1/uuid4``, ``os.urandom``, ``open``, ``socket`` connections or
``threading.Thread.start``. The hook is per thread and installed only for the duration of one step,
so activities and Kafka clients running in other threads are never affected. Calls made by the
``logging`` package are allowed (a log record reads the clock). Profiling costs time, so the
sandbox is on by default for development and tests and can be switched off in production with
``KFLOW_WORKFLOW_SANDBOX=0``.
"""

from __future__ import annotations

import builtins
import datetime
import io
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Optional

from kflow.model.errors import KflowError

__all__ = ["Sandbox", "WorkflowSandboxError", "sandbox_enabled"]


class WorkflowSandboxError(KflowError):
    """Workflow code called something non-deterministic; ``what`` names it and ``instead`` the fix."""

    def __init__(self, what: str, instead: str) -> None:
        self.what, self.instead = what, instead
        self.type = "WorkflowSandboxError"
        self.message = (f"workflow code called {what}, which is not deterministic under replay; "
                        f"use {instead} instead")
        super().__init__(self.message)


def sandbox_enabled() -> bool:
    """The default for new workflows: on unless ``KFLOW_WORKFLOW_SANDBOX`` is 0/false/off."""
    return os.environ.get("KFLOW_WORKFLOW_SANDBOX", "1").strip().lower() not in ("0", "false", "off", "no")


_INSTEAD_TIME = "ctx.now() or ctx.sleep()"
_INSTEAD_RANDOM = "ctx.random() or ctx.uuid4()"
_INSTEAD_IO = "an activity (or ctx.side_effect for a small local value)"

#: Builtin (C) callables, matched by identity on ``c_call`` events.
_C_BANNED: dict[int, tuple[str, str]] = {
    id(time.time): ("time.time()", _INSTEAD_TIME),
    id(time.time_ns): ("time.time_ns()", _INSTEAD_TIME),
    id(time.sleep): ("time.sleep()", "await ctx.sleep()"),
    id(os.urandom): ("os.urandom()", _INSTEAD_RANDOM),
    id(builtins.open): ("open()", _INSTEAD_IO),
    id(io.open): ("open()", _INSTEAD_IO),
}
#: Builtin methods of classes, matched by (owner, name).
_C_METHODS: dict[tuple[Any, str], tuple[str, str]] = {
    (datetime.datetime, "now"): ("datetime.now()", "ctx.now()"),
    (datetime.datetime, "utcnow"): ("datetime.utcnow()", "ctx.now()"),
    (datetime.datetime, "today"): ("datetime.today()", "ctx.now()"),
    (datetime.date, "today"): ("date.today()", "ctx.now()"),
}
#: Python functions, matched by code object on ``call`` events.
_PY_BANNED: dict[Any, tuple[str, str]] = {
    uuid.uuid1.__code__: ("uuid.uuid1()", _INSTEAD_RANDOM),
    uuid.uuid4.__code__: ("uuid.uuid4()", _INSTEAD_RANDOM),
    socket.socket.__init__.__code__: ("socket.socket()", _INSTEAD_IO),
    socket.create_connection.__code__: ("socket.create_connection()", _INSTEAD_IO),
    threading.Thread.start.__code__: ("threading.Thread.start()", "ctx.gather() of coroutines"),
}
_GLOBAL_RANDOM: Any = getattr(random, "_inst", None)
_RANDOM_FILE = random.__file__


def _caller_allowed(frame: Optional[FrameType]) -> bool:
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return name == "logging" or name.startswith("logging.")


def _profile(frame: FrameType, event: str, arg: Any) -> None:
    if event == "c_call":
        hit = _C_BANNED.get(id(arg))
        if hit is None:
            owner = getattr(arg, "__self__", None)
            if owner is _GLOBAL_RANDOM and owner is not None:
                hit = (f"random.{arg.__name__}()", _INSTEAD_RANDOM)
            elif isinstance(owner, type):
                hit = _C_METHODS.get((owner, arg.__name__))
        if hit is not None and not _caller_allowed(frame):
            raise WorkflowSandboxError(*hit)
    elif event == "call":
        code = frame.f_code
        hit = _PY_BANNED.get(code)
        if hit is None and code.co_filename == _RANDOM_FILE and _GLOBAL_RANDOM is not None \
                and frame.f_locals.get("self") is _GLOBAL_RANDOM:
            hit = (f"random.{code.co_name}()", _INSTEAD_RANDOM)
        if hit is not None and not _caller_allowed(frame.f_back):
            raise WorkflowSandboxError(*hit)


class Sandbox:
    """A context-manager factory the replayer enters around each step of workflow code."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        previous = sys.getprofile()
        sys.setprofile(_profile)
        try:
            yield
        finally:
            sys.setprofile(previous)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Lift the sandbox (for ``ctx.side_effect`` functions), restoring it afterwards."""
        previous = sys.getprofile()
        sys.setprofile(None)
        try:
            yield
        finally:
            sys.setprofile(previous)
