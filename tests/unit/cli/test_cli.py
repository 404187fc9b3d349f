"""The ``kflow`` command line: expected failures are one ``error:`` line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kflow.cli import app

COMMANDS = ["deploy", "start", "signal", "cancel", "status", "result", "engine", "worker", "dev", "bench"]
UNREACHABLE = "127.0.0.1:1"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def _no_ambient_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands must not pick up a developer's KFLOW_* settings."""
    for name in ("KFLOW_BOOTSTRAP", "KFLOW_TOPIC_PREFIX", "KFLOW_PARTITIONS"):
        monkeypatch.delenv(name, raising=False)


def _one_error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line on stderr, got {lines!r}"
    return errors[0]


def test_start_with_bad_json_input(runner: CliRunner) -> None:
    result = runner.invoke(app, ["start", "order", "--input", "{not json", "--bootstrap", UNREACHABLE])
    line = _one_error_line(result)
    assert "--input is not valid JSON" in line
    assert result.exit_code == 1


def test_signal_with_bad_json_data(runner: CliRunner) -> None:
    result = runner.invoke(app, ["signal", "id-1", "approval", "--data", "[1,", "--bootstrap", UNREACHABLE])
    assert "--data is not valid JSON" in _one_error_line(result)


def test_deploy_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = runner.invoke(app, ["deploy", str(missing), "--bootstrap", UNREACHABLE])
    line = _one_error_line(result)
    assert "no such file" in line and "nope.yaml" in line


def test_deploy_invalid_definition_names_the_step(runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad\nversion: 1\nsteps:\n"
        "  - id: first\n    task: t.inc\n"
        "  - id: broken\n    sleep: forever\n"
    )
    result = runner.invoke(app, ["deploy", str(spec), "--bootstrap", UNREACHABLE])
    line = _one_error_line(result)
    # validation happens before any connection attempt: the broker is unreachable, yet the
    # error is about the definition
    assert "broken" in line and "invalid definition 'bad'" in line
    assert "cannot reach Kafka" not in result.output


def test_deploy_file_that_is_not_yaml(runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "garbage.yaml"
    spec.write_text("name: [unclosed\n")
    line = _one_error_line(runner.invoke(app, ["deploy", str(spec), "--bootstrap", UNREACHABLE]))
    assert "not valid YAML/JSON" in line


@pytest.mark.parametrize("args", [
    ["start", "order", "--input", "{}"],
    ["status", "some-id"],
    ["deploy", "SPEC"],
])
@pytest.mark.timeout(60)  # a hang, not slowness, is the failure this guards against
def test_unreachable_broker_is_a_clear_error(runner: CliRunner, tmp_path: Path, args: list[str]) -> None:
    spec = tmp_path / "ok.yaml"
    spec.write_text("name: ok\nversion: 1\nsteps:\n  - id: done\n    succeed: input\n")
    args = [str(spec) if a == "SPEC" else a for a in args]
    result = runner.invoke(app, [*args, "--bootstrap", UNREACHABLE])
    line = _one_error_line(result)
    assert f"cannot reach Kafka at {UNREACHABLE}" in line


def test_unreachable_broker_from_environment(runner: CliRunner) -> None:
    result = runner.invoke(app, ["cancel", "some-id"], env={"KFLOW_BOOTSTRAP": UNREACHABLE})
    assert UNREACHABLE in _one_error_line(result)


def test_worker_with_unknown_module(runner: CliRunner) -> None:
    result = runner.invoke(app, ["worker", "-m", "no_such_module_kflow_test", "--bootstrap", UNREACHABLE])
    assert "cannot import module 'no_such_module_kflow_test'" in _one_error_line(result)


def test_engine_with_unknown_workflow_module(runner: CliRunner) -> None:
    result = runner.invoke(app, ["engine", "--workflows", "no_such_wf_module", "--bootstrap", UNREACHABLE])
    assert "no_such_wf_module" in _one_error_line(result)


def test_start_rejects_unknown_id_reuse_policy(runner: CliRunner) -> None:
    result = runner.invoke(app, ["start", "order", "--id-reuse", "sometimes", "--bootstrap", UNREACHABLE])
    assert "id_reuse must be one of" in _one_error_line(result)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_description_and_example(runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: kflow " + command in result.output
    assert "--bootstrap" in result.output and "KFLOW_BOOTSTRAP" in result.output
    assert "--prefix" in result.output


def test_top_level_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_dev_demo_option_takes_an_optional_name(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def fake_run_dev(bootstrap, worker_modules, demo, prefix, **kw):
        calls.append((bootstrap, worker_modules, demo, prefix, kw))

    import sys
    import types

    monkeypatch.setitem(sys.modules, "kflow.dev.stack", types.SimpleNamespace(run_dev=fake_run_dev))
    assert runner.invoke(app, ["dev", "--demo"]).exit_code == 0
    assert runner.invoke(app, ["dev", "--demo", "invoice", "-m", "a.b", "-m", "c"]).exit_code == 0
    assert runner.invoke(app, ["dev", "--bootstrap", "h:1", "--prefix", "x.", "--workflows", "w"]).exit_code == 0
    assert calls == [
        (None, [], "order", None, {}),
        (None, ["a.b", "c"], "invoice", None, {}),
        ("h:1", [], None, "x.", {"workflows": "w"}),
    ]


def test_bench_passes_options(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def fake_run_bench(bootstrap, n, concurrency, style, prefix, rate=None, partitions=4, json_out=None,
                       breakdown=False, curve=False):
        calls.append((bootstrap, n, concurrency, style, prefix, rate, breakdown, curve))

    import sys
    import types

    monkeypatch.setitem(sys.modules, "kflow.dev.bench", types.SimpleNamespace(run_bench=fake_run_bench))
    assert runner.invoke(app, ["bench"]).exit_code == 0
    assert runner.invoke(app, ["bench", "-n", "10", "-c", "2", "--style", "code", "--rate", "50"]).exit_code == 0
    assert runner.invoke(app, ["bench", "--breakdown", "--curve"]).exit_code == 0
    assert calls == [(None, 2000, 64, "spec", None, None, False, False), (None, 10, 2, "code", None, 50.0, False, False),
                     (None, 2000, 64, "spec", None, None, True, True)]


def test_bench_auth_passes_the_option_and_refuses_other_modes(runner: CliRunner,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def fake_run_bench(bootstrap, n, concurrency, style, prefix, rate=None, partitions=4, json_out=None,
                       breakdown=False, curve=False, local=False, auth=False, rounds=1):
        calls.append((bootstrap, n, concurrency, style, local, auth, rounds))

    import sys
    import types

    monkeypatch.setitem(sys.modules, "kflow.dev.bench", types.SimpleNamespace(run_bench=fake_run_bench))
    assert runner.invoke(app, ["bench", "--auth", "-n", "20", "-c", "4", "--rounds", "3"]).exit_code == 0
    assert runner.invoke(app, ["bench", "--auth", "--local", "--bootstrap", "h:1"]).exit_code == 0
    assert runner.invoke(app, ["bench"]).exit_code == 0
    assert calls == [(None, 20, 4, "spec", False, True, 3), ("h:1", 2000, 64, "spec", True, True, 1),
                     (None, 2000, 64, "spec", False, False, 1)]
    for other in ("--mix", "--failover", "--curve", "--breakdown"):
        assert "--auth compares the plain" in _one_error_line(runner.invoke(app, ["bench", "--auth", other]))
    assert "use it with --auth" in _one_error_line(runner.invoke(app, ["bench", "--rounds", "2"]))
    assert runner.invoke(app, ["bench", "--auth", "--rounds", "0"]).exit_code == 2  # at least 1
    assert len(calls) == 3
    assert "--auth" in runner.invoke(app, ["bench", "--help"], terminal_width=200).output


def test_bench_auth_takes_the_median_over_rounds() -> None:
    from kflow.dev.bench import _median_of_pairs

    def pair(loss: float, p50: float, cpu: float | None) -> dict:
        return {"comparison": [{"throughput_loss_pct": loss}, {"p50_ratio": p50, "p99_ratio": None}],
                "cpu_cost_pct": cpu}

    m = _median_of_pairs([pair(20.0, 1.2, 5.0), pair(-1.0, 0.9, None), pair(4.0, 1.0, 3.0)])
    assert m == {"throughput_loss_pct": 4.0, "latency_p50_ratio": 1.0, "latency_p99_ratio": None,
                 "throughput_cpu_cost_pct": 4.0}


def test_bench_auth_compares_phases_off_against_on() -> None:
    from kflow.dev.bench import compare_phases

    def phase(name: str, per_s: float, p50: float, p99: float, failed: int = 0) -> dict:
        return {"phase": name, "completed_per_s": per_s, "p50_ms": p50, "p99_ms": p99, "failed": failed, "missed": 0}

    rows = compare_phases([phase("throughput", 250.0, 200.0, 400.0), phase("latency@50/s", 50.0, 100.0, 0.0)],
                          [phase("throughput", 225.0, 220.0, 500.0, 1), phase("latency@50/s", 50.0, 110.0, 30.0)])
    assert rows[0]["throughput_loss_pct"] == 10.0
    assert (rows[0]["p50_ratio"], rows[0]["p99_ratio"], rows[0]["failed"]) == (1.1, 1.25, [0, 1])
    assert (rows[1]["throughput_loss_pct"], rows[1]["p50_ratio"], rows[1]["p99_ratio"]) == (0.0, 1.1, None)


CHOICES = [
    (["bench"], "--style", ("spec", "code")),
    (["batch", "report", "b-1"], "--format", ("table", "json")),
    (["batch", "report", "b-1"], "--only", ("applied", "rejected", "dead-lettered", "unanswered", "pending")),
    (["audit", "list"], "--outcome", ("granted", "denied", "success")),
]


@pytest.mark.parametrize(("command", "option", "allowed"), CHOICES, ids=[f"{c[0][0]}{c[1]}" for c in CHOICES])
def test_fixed_word_options_are_choices(runner: CliRunner, command: list[str], option: str,
                                        allowed: tuple[str, ...]) -> None:
    """A wrong value is a usage error (exit 2) naming the allowed values, before anything runs; --help lists them."""
    wide = {"COLUMNS": "250"}
    result = runner.invoke(app, [*command, option, "bogus", "--bootstrap", UNREACHABLE], env=wide)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert f"'bogus' is not one of {', '.join(repr(v) for v in allowed)}" in result.output
    usage = [arg for arg in command if not arg.startswith("b-")]
    assert f"<{'|'.join(allowed)}>" in runner.invoke(app, [*usage, "--help"], env=wide).output
