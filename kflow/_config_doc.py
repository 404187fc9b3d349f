"""Render the configuration table (from the settings classes) and the metrics table (from the registry).

``python -m kflow._config_doc`` prints the configuration table, ``python -m kflow._config_doc
metrics`` the metrics table; unit tests keep both in sync with docs/configuration.md and docs/operations.md.
"""

from __future__ import annotations

from kflow.config import EngineConfig, KafkaConfig, TriggerConfig, VisibilityConfig, WorkerConfig

#: Process kinds and their settings class, in table order; later classes list only their own fields.
PROCESSES: tuple[tuple[type[KafkaConfig], str], ...] = ((KafkaConfig, "all"), (EngineConfig, "engine"),
                                                       (WorkerConfig, "worker"), (TriggerConfig, "triggers"),
                                                       (VisibilityConfig, "visibility"))

PASSTHROUGH_ROW = ("| `KFLOW_KAFKA_*` | all |  | Any other librdkafka setting: `KFLOW_KAFKA_SSL_CA_LOCATION` sets "
                   "`ssl.ca.location`, `KFLOW_KAFKA_SASL_OAUTHBEARER_METHOD` sets `sasl.oauthbearer.method` "
                   "(name upper-cased, `.` as `_`); secrets among them are never logged. |")


def _default(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return f"`{value}`" if value else '""'
    return repr(value)


def config_table() -> str:
    """The markdown table: one row per ``KFLOW_*`` variable."""
    rows = ["| variable | process | default | meaning |", "|---|---|---|---|"]
    seen: set[str] = set()
    for cls, who in PROCESSES:
        for name, f in cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            rows.append(f"| `KFLOW_{name.upper()}` | {who} | {_default(f.default)} | {f.description or ''} |")
        if cls is KafkaConfig:
            rows.append(PASSTHROUGH_ROW)
    return "\n".join(rows)


#: Modules that register kflow's metrics (imported to fill the registry).
METRIC_MODULES = ("kflow.streams.metrics", "kflow._worker.metrics", "kflow.connectors.host", "kflow.connectors.triggers",
                  "kflow.visibility.projection", "kflow.subscriptions")
#: Which processes export a metric, by name prefix (first match wins).
_EXPORTED_BY = (("kflow_worker_", "worker"), ("kflow_activity_", "worker"), ("kflow_connector_", "connect"),
                ("kflow_trigger_", "triggers"), ("kflow_subscription_", "subscriptions"), ("kflow_visibility_", "visibility"),
                ("kflow_consumer_lag", "engine, worker"), ("kflow_dlq_", "engine, worker"), ("kflow_", "engine"))


def metrics_table() -> str:
    """The markdown table of every ``kflow_*`` metric: name, type, labels, process, meaning."""
    import importlib

    from prometheus_client import REGISTRY

    for name in METRIC_MODULES:
        importlib.import_module(name)
    rows = ["| metric | type | labels | process | meaning |", "|---|---|---|---|---|"]
    found = []
    # prometheus_client has no public list of collectors that keeps the label names of unobserved metrics
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001
        name = getattr(collector, "_name", "")
        if not name.startswith("kflow_"):
            continue
        kind = getattr(collector, "_type", "")
        shown = f"{name}_total" if kind == "counter" else name
        labels = ", ".join(f"`{lbl}`" for lbl in getattr(collector, "_labelnames", ()))
        who = next(p for prefix, p in _EXPORTED_BY if name.startswith(prefix))
        found.append(f"| `{shown}` | {kind} | {labels} | {who} | {getattr(collector, '_documentation', '')} |")
    return "\n".join(rows + sorted(found))


if __name__ == "__main__":
    import sys

    print(metrics_table() if sys.argv[1:] == ["metrics"] else config_table())
