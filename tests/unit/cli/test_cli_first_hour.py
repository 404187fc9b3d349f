"""The CLI as a new user meets it: local modules import, import failures say why, the dev stack is found.

No broker is needed here: commands pointed at an unreachable address fail with their one
``error:`` line, which is enough to see which address and settings they used.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kflow._cli.common import ModuleImportError, import_modules
from kflow.cli import app
from kflow.config import DEV_FILE, DevStackFile, KafkaConfig, read_dev_file

UNREACHABLE = "127.0.0.1:1"


@pytest.fixture(autouse=True)
def _no_ambient_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KFLOW_BOOTSTRAP", "KFLOW_TOPIC_PREFIX", "KFLOW_PARTITIONS", "KFLOW_DEV_TUNING", "KFLOW_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the current folder, and not on ``sys.path`` (as for the ``kflow`` script)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    return tmp_path


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --------------------------------------------------------------------------- importing user modules


def test_a_module_in_the_current_folder_imports(user_folder: Path) -> None:
    (user_folder / "first_hour_acts.py").write_text("VALUE = 42\n")
    try:
        [module] = import_modules(["first_hour_acts"])
        assert module.VALUE == 42
    finally:
        sys.modules.pop("first_hour_acts", None)


def test_the_kflow_script_imports_a_module_of_the_current_folder(tmp_path: Path) -> None:
    """The console script (not ``python -m``) gets past the import and fails only on the broker."""
    (tmp_path / "acts.py").write_text("from kflow import activity\n\n@activity\ndef hello(x):\n    return x\n")
    script = Path(sys.executable).with_name("kflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KFLOW_") and k != "PYTHONPATH"}
    out = subprocess.run([str(script), "worker", "-m", "acts", "--bootstrap", UNREACHABLE, "--metrics-port", "0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "cannot import" not in out.stderr, out.stderr
    assert "cannot reach Kafka at 127.0.0.1:1" in out.stderr, out.stderr


def test_a_missing_dependency_of_a_user_module_is_named(user_folder: Path) -> None:
    (user_folder / "acts_needing_pkg.py").write_text("import kflow_first_hour_missing_pkg\n")
    result = CliRunner().invoke(app, ["worker", "-m", "acts_needing_pkg", "--bootstrap", UNREACHABLE])
    line = _error_line(result)
    assert "acts_needing_pkg" in line and "No module named 'kflow_first_hour_missing_pkg'" in line, line
    assert "acts_needing_pkg.py, line 1" in line, line


def test_an_exception_inside_a_user_module_is_shown(user_folder: Path) -> None:
    (user_folder / "flows_raising.py").write_text("X = 1\nraise RuntimeError('settings file missing')\n")
    result = CliRunner().invoke(app, ["engine", "--workflows", "flows_raising", "--bootstrap", UNREACHABLE])
    line = _error_line(result)
    assert "cannot import module 'flows_raising': RuntimeError: settings file missing" in line, line
    assert "line 2" in line


def test_a_module_that_does_not_exist_says_where_it_was_looked_for(user_folder: Path) -> None:
    with pytest.raises(ModuleImportError) as info:
        import_modules(["no_such_module_anywhere"])
    assert f"no module named 'no_such_module_anywhere' (searched the current folder {user_folder}" in str(info.value)


# --------------------------------------------------------------------------- the dev stack's file


def _dev_file(folder: Path, pid: int) -> DevStackFile:
    dev = DevStackFile(UNREACHABLE, "fh.", 4, pid, folder / DEV_FILE)
    dev.write()
    return dev


def test_commands_use_the_dev_stack_of_the_current_folder(user_folder: Path) -> None:
    _dev_file(user_folder, os.getpid())
    result = CliRunner().invoke(app, ["status", "some-id"])
    assert "using the dev stack at 127.0.0.1:1 (topics fh.*, 4 partitions" in result.stderr, result.stderr
    assert "cannot reach Kafka at 127.0.0.1:1" in _error_line(result)
    assert "KFLOW_BOOTSTRAP" not in os.environ  # only for the duration of the command


def test_an_explicit_bootstrap_wins_over_the_dev_stack(user_folder: Path) -> None:
    _dev_file(user_folder, os.getpid())
    result = CliRunner().invoke(app, ["status", "some-id", "--bootstrap", "127.0.0.1:2"])
    assert "using the dev stack" not in result.stderr
    assert "cannot reach Kafka at 127.0.0.1:2" in _error_line(result)


def test_the_file_of_a_stack_that_is_gone_is_ignored(user_folder: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _dev_file(user_folder, dead.pid)
    assert read_dev_file() is None
    assert read_dev_file(check_alive=False) is not None


def test_the_dev_file_is_removed_only_by_its_own_stack(user_folder: Path) -> None:
    mine = _dev_file(user_folder, os.getpid())
    DevStackFile(UNREACHABLE, "other.", 4, os.getpid() + 1, mine.path).remove()
    assert mine.path.exists()
    mine.remove()
    assert not mine.path.exists()


# --------------------------------------------------------------------------- logging


def test_librdkafka_log_lines_go_through_python_logging(caplog: pytest.LogCaptureFixture,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    from confluent_kafka import Consumer

    from kflow.testing import assert_eventually

    consumer = Consumer(KafkaConfig(bootstrap=UNREACHABLE).consumer_conf("fh-logs"))
    try:
        with caplog.at_level(logging.DEBUG, logger="kflow.kafka"):
            consumer.subscribe(["fh-topic"])

            def logged() -> bool:
                consumer.poll(0.1)
                return any(r.name == "kflow.kafka" and "127.0.0.1:1" in r.getMessage() for r in caplog.records)

            assert_eventually(logged, timeout=30)
    finally:
        consumer.close()
    assert "|FAIL|" not in capfd.readouterr().err  # nothing raw on stderr


@pytest.fixture
def kflow_log_levels() -> None:
    yield
    for name in ("kflow", "kflow.kafka"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.usefixtures("kflow_log_levels")
def test_one_shot_commands_log_warnings_only_and_services_log_info(user_folder: Path) -> None:
    """A command that prints its result does not repeat it as an INFO log line; services keep INFO."""
    CliRunner().invoke(app, ["status", "some-id", "--bootstrap", UNREACHABLE])
    assert logging.getLogger("kflow").level == logging.WARNING
    assert logging.getLogger("kflow.kafka").level == logging.CRITICAL  # the error line says it all
    CliRunner().invoke(app, ["worker", "-m", "no_such_module_anywhere", "--bootstrap", UNREACHABLE])
    assert logging.getLogger("kflow").level == logging.INFO
    assert logging.getLogger("kflow.kafka").level == logging.NOTSET


@pytest.mark.usefixtures("kflow_log_levels")
def test_an_explicit_log_level_applies_to_one_shot_commands(user_folder: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFLOW_LOG_LEVEL", "INFO")
    CliRunner().invoke(app, ["status", "some-id", "--bootstrap", UNREACHABLE])
    assert logging.getLogger("kflow").level == logging.INFO
