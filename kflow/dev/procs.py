"""Child processes of the embedded stack: engines and workers run as ``python -m kflow ...``.

Running each processor in its own process is what production does (one container each), lets
``kflow bench`` report each one's RSS, and lets the fault tests SIGKILL an engine for real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class KflowProcess:
    """One ``kflow`` subcommand running as a child process, its output in ``log_path``."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> KflowProcess:
        """Start the child; its output goes to ``log_path`` (a new temporary file when empty)."""
        if not self.log_path:
            fd, self.log_path = tempfile.mkstemp(prefix=f"kflow-{self.args[0]}-", suffix=".log")
            os.close(fd)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kflow", *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> Optional[int]:
        """SIGTERM and wait for a graceful exit; SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def rss_mb(self) -> float:
        """Resident set size in MiB (Linux ``/proc``); 0 when unavailable."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def engine_process(bootstrap: str, prefix: str, state_dir: str, *, partitions: int = 8,
                   engine_id: str = "", workflows: str = "", dev: bool = True, metrics_port: int = 0,
                   extra_env: Optional[dict[str, str]] = None, activities: str = "") -> KflowProcess:
    """``kflow engine``; ``activities`` are the modules of the local activities it runs itself."""
    env = {"KFLOW_BOOTSTRAP": bootstrap, "KFLOW_TOPIC_PREFIX": prefix, "KFLOW_STATE_DIR": state_dir,
           "KFLOW_PARTITIONS": str(partitions), "KFLOW_DEV_TUNING": "true" if dev else "false",
           "KFLOW_METRICS_PORT": str(metrics_port)}
    if engine_id:
        env["KFLOW_ENGINE_ID"] = engine_id
    if workflows:
        env["KFLOW_WORKFLOWS"] = workflows
    if activities:
        env["KFLOW_ACTIVITIES"] = activities
    env.update(extra_env or {})
    return KflowProcess(["engine"], env)


def worker_process(bootstrap: str, prefix: str, modules: list[str], *, partitions: int = 8,
                   concurrency: int = 32, dev: bool = True, metrics_port: int = 0,
                   connectors: str = "") -> KflowProcess:
    """``kflow worker`` for ``modules`` (and the connectors of the file ``connectors``, if given)."""
    args = ["worker"]
    for m in modules:
        args += ["-m", m]
    if connectors:
        args += ["--connectors", os.path.abspath(connectors)]
    env = {"KFLOW_BOOTSTRAP": bootstrap, "KFLOW_TOPIC_PREFIX": prefix, "KFLOW_PARTITIONS": str(partitions),
           "KFLOW_CONCURRENCY": str(concurrency), "KFLOW_DEV_TUNING": "true" if dev else "false",
           "KFLOW_METRICS_PORT": str(metrics_port)}
    return KflowProcess(args, env)
