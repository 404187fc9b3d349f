"""``kflow connect FILE``: a worker serving the operations of the connectors declared in FILE.

It is ``kflow worker --connectors FILE`` without activity modules. Both run the connectors on
their own event loop (:class:`~kflow.connectors.host.ConnectorHost`), serve ``<connector>.<op>``
activities on each connector's queue, and report connector health on ``/healthz`` and
``/readyz`` (not ready while any connector is down).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Annotated, Any, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, setup_logging
from kflow._cli.processes import MetricsPort

__all__ = ["connect", "run_worker_with_connectors"]

log = logging.getLogger("kflow.cli")


def run_worker_with_connectors(config: Any, modules: list[ModuleType], connectors_file: str) -> None:
    """Run a worker for ``modules`` and the connectors of ``connectors_file`` until SIGINT/SIGTERM.

    Raises:
        ConnectorConfigError: the connectors file is invalid (every problem listed).
        FileNotFoundError: it does not exist.
    """
    from kflow._cli.processes import describe_worker, log_when_ready, run_until_signalled, start_telemetry
    from kflow.connectors.config import load_connectors, redacted
    from kflow.connectors.host import ConnectorHost
    from kflow.worker import Worker

    specs = load_connectors(connectors_file)
    host = ConnectorHost(specs)
    for spec in specs:
        log.info("connector %s (%s) on queue %s: operations %s; settings %s", spec.name, spec.type, spec.queue,
                 ", ".join(sorted(spec.operations)), redacted(spec))
    runner = Worker(config, host.activities(modules or None))
    host.start()
    server = None
    try:
        start_telemetry(config.model_copy(update={"metrics_port": 0}), "worker", host.ready)  # tracing only
        port = config.metrics_port_for("connect")
        if port:
            from kflow._http import serve_operations

            server = serve_operations(port, lambda: runner.wait_assigned(0) and host.ready(),
                                      status=host.describe)
        log_when_ready(runner.wait_assigned, lambda: describe_worker(runner), "worker")
        run_until_signalled(runner.run, "worker")
    finally:
        if server is not None:
            server.shutdown()
        host.stop()


def connect(
    file: Annotated[str, typer.Argument(metavar="FILE", help="Connectors YAML file.")],
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", "-c", min=1, envvar="KFLOW_CONCURRENCY",
                                                       help="Operations run at once.")] = None,
    metrics_port: MetricsPort = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Serve the operations of the connectors declared in FILE as activities until SIGINT or SIGTERM.

    Each connector's operations are served as `<connector>.<operation>` on its queue. Connections
    are retried with backoff; /readyz answers 503 while a connector is down.

    Example: kflow connect connectors.yaml --bootstrap kafka:9092
    """
    setup_logging(verbose)
    from kflow._cli.processes import _settings
    from kflow.config import WorkerConfig, fit_to_cluster, load_config
    from kflow.connectors.config import load_connectors

    load_connectors(file)  # a bad connectors file is reported before any broker is asked
    config = fit_to_cluster(load_config(WorkerConfig, **_settings(bootstrap, prefix, concurrency=concurrency,
                                                                             metrics_port=metrics_port)))
    run_worker_with_connectors(config, [], file)
