"""A bare install — ``pip install kflow``, no extras — runs a client round trip, and is bare.

The project is installed without extras into a fresh virtualenv; an engine and a worker run as
that virtualenv's ``kflow`` processes against the session's broker, and a client script run by its
Python deploys a one-activity spec workflow and gets the result. The optional packages (FastAPI,
SQLAlchemy, MQTT, AMQP, SMTP, aiohttp, OpenTelemetry) must not be importable there, and a feature
that needs one fails naming the extra to install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kflow.testing import assert_eventually
from tests.net import free_port, http_get

ROOT = Path(__file__).resolve().parents[2]
#: Import names of the packages only extras bring.
OPTIONAL = ("sqlalchemy", "psycopg", "fastapi", "uvicorn", "aiomqtt", "aio_pika", "aiosmtplib", "aiohttp",
            "opentelemetry")
#: ``spawn(executable, args, env, name) -> (process, log file)``
Spawn = Callable[[Path, list[str], dict[str, str], str], tuple[subprocess.Popen[bytes], Path]]

ACTIVITIES = '''import kflow


@kflow.activity("bare.greet")
def greet(name):
    return f"hello {name}"
'''

CLIENT = '''import json

import kflow

spec = {"name": "bare.greet", "version": 1,
        "steps": [{"id": "greet", "task": "bare.greet", "input": "input", "output": "greeting"},
                  {"id": "done", "succeed": "greeting"}]}
with kflow.Client() as client:
    client.deploy(spec)
    print(json.dumps(client.start("bare.greet", "kafka").result(timeout=90)))
'''

CONNECTORS = """connectors:
  - name: db
    type: sql
    settings: {url: "sqlite:///db.sqlite"}
    operations:
      one: {statement: "SELECT 1"}
"""

#: Without OpenTelemetry tracing is a no-op, headers pass through, and asking for an exporter names the extra.
TRACING = '''import sys

from kflow import _tracing

tp = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
assert not _tracing.configure("bare", "") and _tracing.client_start("w", "i") is None
assert _tracing.engine_step("SignalWorkflow", "i", [("traceparent", tp)], None, [], 0) == [("traceparent", tp)]
print("no-op")
try:
    _tracing.configure("bare", "http://127.0.0.1:4318")
except ModuleNotFoundError as exc:
    print(exc, file=sys.stderr)
'''


def _env(**extra: str) -> dict[str, str]:
    """This environment without kflow settings or paths into the working tree, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KFLOW_", "OTEL_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHONUNBUFFERED": "1", "KFLOW_LOG_FORMAT": "json", **extra}


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh virtualenv holding kflow installed from this tree without extras."""
    root = tmp_path_factory.mktemp("bare")
    src = root / "src"  # a copy: building in the working tree would leave build/ and egg-info in it
    shutil.copytree(ROOT / "kflow", src / "kflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    bin_dir = root / "venv" / "bin"
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                          str(src)], capture_output=True, text=True, timeout=600, env=_env())
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return bin_dir


def _python(bare: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bare / "python"), "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=_env())


def test_the_bare_install_is_bare_and_names_the_extra_a_feature_needs(bare: Path, tmp_path: Path) -> None:
    where = _python(bare, "import kflow; print(kflow.__file__)", tmp_path)
    assert where.stdout.startswith(str(bare.parent)), where.stdout + where.stderr  # not the working tree
    probe = (f"import importlib\nfor name in {OPTIONAL!r}:\n    try:\n        importlib.import_module(name)\n"
             "    except ImportError:\n        continue\n    print(name)\n")
    importable = _python(bare, probe, tmp_path)
    assert importable.returncode == 0 and importable.stdout.split() == [], importable.stdout + importable.stderr

    help_ = subprocess.run([str(bare / "kflow"), "--help"], capture_output=True, text=True, timeout=60,
                           cwd=tmp_path, env=_env())
    assert help_.returncode == 0 and "engine" in help_.stdout and "worker" in help_.stdout, help_.stderr
    console = subprocess.run([str(bare / "kflow"), "visibility", "--bootstrap", "127.0.0.1:1"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path, env=_env())
    assert console.returncode == 1
    assert "needs the visibility extra: pip install 'kflow[visibility]'" in console.stderr, console.stderr
    mqtt = _python(bare, "import kflow.connectors.mqtt", tmp_path)
    assert "the MQTT connector needs the mqtt extra: pip install 'kflow[mqtt]'" in mqtt.stderr, mqtt.stderr
    (tmp_path / "connectors.yaml").write_text(CONNECTORS)
    connect = subprocess.run([str(bare / "kflow"), "connect", "connectors.yaml", "--bootstrap", "127.0.0.1:1"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_env())
    assert connect.returncode == 1
    assert "connector 'db': the SQL connector needs the sql extra: pip install 'kflow[sql]'" in connect.stderr, \
        connect.stderr
    tracing = _python(bare, TRACING, tmp_path)
    assert tracing.returncode == 0 and tracing.stdout.split() == ["no-op"], tracing.stdout + tracing.stderr
    assert "exporting spans needs the otel extra: pip install 'kflow[otel]'" in tracing.stderr, tracing.stderr


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start ``EXE ARGS`` in ``tmp_path``, output in ``<name>.log``; every child is stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(exe: Path, args: list[str], env: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            procs.append(subprocess.Popen([str(exe), *args], cwd=tmp_path, env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
        return procs[-1], log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_client_round_trip_on_the_bare_install(bare: Path, kafka_bootstrap: str, tmp_path: Path,
                                                  spawn: Spawn) -> None:
    (tmp_path / "bare_acts.py").write_text(ACTIVITIES)
    settings = {"KFLOW_BOOTSTRAP": kafka_bootstrap, "KFLOW_TOPIC_PREFIX": f"bare{uuid.uuid4().hex[:8]}.",
                "KFLOW_PARTITIONS": "2", "KFLOW_DEV_TUNING": "true"}
    args = {"engine": ["engine", "--state-dir", str(tmp_path / "state")], "worker": ["worker", "-m", "bare_acts"]}
    ports = {name: free_port() for name in args}
    procs = {name: spawn(bare / "kflow", args[name], _env(**settings, KFLOW_METRICS_PORT=str(ports[name])), name)
             for name in args}

    def ready() -> bool:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:  # exited: no point in waiting
                raise RuntimeError(f"kflow {name} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            status = http_get(f"http://127.0.0.1:{ports[name]}/readyz")[0]
            assert status == 200, f"{name} /readyz: {status}\n{log.read_text(errors='replace')[-2000:]}"
        return True

    assert_eventually(ready, timeout=90, interval=0.2, msg="engine and worker of the bare install ready")
    client = subprocess.run([str(bare / "python"), "-c", CLIENT], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=_env(**settings))
    assert client.returncode == 0, client.stdout + client.stderr
    assert json.loads(client.stdout.strip().splitlines()[-1]) == "hello kafka"
