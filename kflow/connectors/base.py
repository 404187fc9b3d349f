"""The connector contract: configured activities that talk to the outside world.

A connector is declared in YAML (name, type, connection settings, operations); a
:class:`Connector` subclass registered for its ``type`` turns the declaration into activities named
``<connector>.<operation>``. Every operation is an ``async`` function of the activity input (a
JSON value) returning a JSON value, run on the connector's own event loop by the host.

Failures are reported through :class:`ConnectorError`: its ``type`` becomes the activity's error
type (which retry policies and ``catch`` match) and ``retryable`` decides whether the engine may
retry the attempt. Any other exception is a retryable failure typed by its class name.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kflow.model.errors import KflowError

__all__ = [
    "Connector",
    "ConnectorConfigError",
    "ConnectorError",
    "ConnectorSpec",
    "Operation",
    "connector_type",
    "connector_types",
    "unknown_type",
]

#: An operation: ``await op(input) -> result``.
Operation = Callable[[Any], Awaitable[Any]]


class ConnectorError(KflowError):
    """An operation failed; ``type`` is the activity error type, ``retryable`` whether to retry."""

    def __init__(self, type: str, message: str, *, retryable: bool = True) -> None:
        self.type = type
        self.message = message
        self.retryable = retryable
        super().__init__(f"{type}: {message}")


class ConnectorConfigError(KflowError):
    """A connector declaration is invalid (unknown type, missing setting, bad operation)."""


@dataclass(slots=True)
class ConnectorSpec:
    """One connector as declared: ``settings`` already have ``${ENV}`` references resolved.

    Attributes:
        name: The connector's name; its activities are ``<name>.<operation>``.
        type: The registered connector type (``mqtt``, ``http``, ``sql``, ``amqp``, ``kafka``, ``email``).
        queue: The task queue its activities are served on.
        settings: Connection settings (URLs, credentials, TLS, timeouts).
        operations: Operation name -> its declaration (templates, mappings, policies).
        secrets: Setting names whose values must never be logged.
    """

    name: str
    type: str
    queue: str = "default"
    settings: dict[str, Any] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()


class Connector(abc.ABC):
    """Base class of connector types. Subclasses set ``type`` and register with :func:`connector_type`.

    The host calls :meth:`connect` once before serving, :meth:`health` periodically, and
    :meth:`disconnect` on shutdown, all on the connector's event loop. :meth:`operations` is
    called once after construction; it must validate every operation declaration and raise
    :class:`ConnectorConfigError` for a bad one, so mistakes fail start-up, not the first task.
    """

    type: ClassVar[str]

    def __init__(self, spec: ConnectorSpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open connections (retrying with backoff is the host's job; raise on failure)."""

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Close connections; must not raise."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """True when the connector can currently serve operations."""

    @abc.abstractmethod
    def operations(self) -> dict[str, Operation]:
        """Operation name -> coroutine function of the activity input."""


_TYPES: dict[str, type[Connector]] = {}


def connector_type(cls: type[Connector]) -> type[Connector]:
    """Class decorator: register ``cls`` under ``cls.type``."""
    _TYPES[cls.type] = cls
    return cls


#: Built-in types whose optional dependencies (their extra) are not installed -> why not.
_UNAVAILABLE: dict[str, str] = {}


def connector_types() -> dict[str, type[Connector]]:
    """Every registered connector type (importing the built-in ones whose extra is installed first)."""
    import importlib

    for mod in ("mqtt", "http", "sql", "amqp", "kafka", "email"):
        try:
            importlib.import_module(f"kflow.connectors.{mod}")
        except ModuleNotFoundError as exc:
            # a built-in module's import names the extra its missing dependency comes with
            if (exc.name or "").startswith("kflow"):
                raise
            _UNAVAILABLE[mod] = str(exc)
    return dict(_TYPES)


def unknown_type(connector: str, type_name: str, known: Iterable[str]) -> str:
    """The problem with declaring ``connector`` of ``type_name``, a type :func:`connector_types` lacks."""
    if type_name in _UNAVAILABLE:
        return f"connector '{connector}': {_UNAVAILABLE[type_name]}"
    return f"connector '{connector}': unknown type '{type_name}' (known types: {', '.join(sorted(known))})"
