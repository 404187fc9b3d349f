"""Connectors: configured activities that talk to devices and enterprise systems.

Declare connectors in YAML (:func:`load_connectors`), run them with a :class:`ConnectorHost`, and
serve their operations as ``<connector>.<operation>`` activities from a worker::

    from kflow.connectors import ConnectorHost
    from kflow.worker import Worker

    host = ConnectorHost.from_file("connectors.yaml")
    host.start()
    Worker(WorkerConfig(), host.activities(my_activities_module)).run()
    host.stop()

or from the command line: ``kflow worker -m myapp.activities --connectors connectors.yaml`` or
``kflow connect connectors.yaml``. The contract for connector types is in :mod:`kflow.connectors.base`.
"""

from __future__ import annotations

from typing import Any

from kflow.connectors.base import (
    Connector,
    ConnectorConfigError,
    ConnectorError,
    ConnectorSpec,
    Operation,
    connector_type,
    connector_types,
)

__all__ = [
    "Connector",
    "ConnectorConfigError",
    "ConnectorError",
    "ConnectorHost",
    "ConnectorSpec",
    "ConnectorUnavailable",
    "Operation",
    "connector_type",
    "connector_types",
    "load_connectors",
]


def __getattr__(name: str) -> Any:
    # the host and the loader are imported on first use, so importing a connector type stays light
    if name in ("ConnectorHost", "ConnectorUnavailable"):
        from kflow.connectors import host

        return getattr(host, name)
    if name == "load_connectors":
        from kflow.connectors.config import load_connectors

        return load_connectors
    raise AttributeError(f"module 'kflow.connectors' has no attribute {name!r}")
