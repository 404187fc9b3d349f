"""``kflow token issue`` and ``kflow policy check|validate``, driven through typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner

from kflow._cli.security import policy_app, token_app
from kflow.security.principal import Principal
from kflow.security.tokens import Keys, verify_token

SECRET = "a-shared-secret-of-at-least-32-bytes!"

POLICY = """\
roles:
  operator: [instance:View, instance:Manage]
bindings:
  acme:
    alice: [operator]
grants:
  acme:
    bob: [instance:Execute, instance:cancel:order-42]
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KFLOW_JWT_SECRET", "KFLOW_JWKS_FILE", "KFLOW_SIGNING_KEY", "KFLOW_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def error_line(result) -> str:
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --------------------------------------------------------------------------- token issue


def test_token_issue_prints_a_token_the_engine_accepts(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFLOW_JWT_SECRET", SECRET)
    result = runner.invoke(token_app, ["issue", "--principal", "alice", "--tenant", "acme", "--roles",
                                       "operator, viewer", "--ttl", "1h"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 3600
    assert verify_token(token, Keys(secret=SECRET.encode()), claims["iat"] + 1) == \
        Principal("alice", "acme", frozenset({"operator", "viewer"}))
    assert SECRET not in result.output


def test_token_issue_without_keys_says_which_variable_to_set(runner: CliRunner) -> None:
    result = runner.invoke(token_app, ["issue", "--principal", "alice"])
    assert result.exit_code == 1
    assert "KFLOW_JWT_SECRET" in error_line(result)


def test_token_issue_with_a_bad_ttl(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFLOW_JWT_SECRET", SECRET)
    result = runner.invoke(token_app, ["issue", "--principal", "alice", "--ttl", "soon"])
    assert result.exit_code == 1
    assert "expected a duration like '2s'" in error_line(result)


def test_token_issue_with_a_short_secret_does_not_print_it(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFLOW_JWT_SECRET", "hunter2")
    result = runner.invoke(token_app, ["issue", "--principal", "alice"])
    assert result.exit_code == 1
    assert "at least 32 bytes" in error_line(result) and "hunter2" not in result.output


# --------------------------------------------------------------------------- policy check


@pytest.mark.parametrize("args,verdict", [
    (["--principal", "alice", "--action", "cancel", "--resource", "instance:order-1"],
     "granted: role 'operator' grants instance:Manage"),
    (["--principal", "bob", "--action", "cancel", "--resource", "instance:order-42"],
     "granted: grant instance:Manage:order-42 on instance 'order-42'"),
    (["--principal", "bob", "--action", "signal", "--resource", "instance:order-7"], "granted: direct grant instance:Execute"),
    (["--principal", "carol", "--action", "status", "--resource", "instance:order-7", "--owner", "carol"],
     "granted: 'carol' owns instance 'order-7'"),
    (["--principal", "carol", "--tenant", "globex", "--roles", "system_admin", "--action", "dlq_replay",
      "--resource", "system:dlq"], "granted: role 'system_admin' allows everything"),
])
def test_policy_check_granted_exits_0(runner: CliRunner, policy_file: Path, args: list[str], verdict: str) -> None:
    tenant = [] if "--tenant" in args else ["--tenant", "acme"]
    result = runner.invoke(policy_app, ["check", "--file", str(policy_file), *tenant, *args])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == verdict


@pytest.mark.parametrize("args,why", [
    (["--principal", "bob", "--action", "cancel", "--resource", "instance:order-43"], "has none"),
    (["--principal", "alice", "--action", "start", "--resource", "definition:order"], "has none"),
    (["--principal", "alice", "--action", "cancel", "--resource", "instance:order-1", "--resource-tenant", "globex",
      "--owner", "alice"], "tenant isolation"),
])
def test_policy_check_denied_exits_1(runner: CliRunner, policy_file: Path, args: list[str], why: str) -> None:
    result = runner.invoke(policy_app, ["check", "--file", str(policy_file), "--tenant", "acme", *args])
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("denied: ") and why in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--action", "fly", "--resource", "instance:x"], "unknown action 'fly'"),
    (["--action", "cancel", "--resource", "order-42"], "expected --resource TYPE:ID"),
    (["--action", "cancel", "--resource", "robot:r2"], "expected a resource type"),
    (["--action", "start", "--resource", "instance:x"], "acts on definition resources"),
])
def test_policy_check_that_cannot_answer_exits_2(runner: CliRunner, policy_file: Path, args: list[str],
                                                 message: str) -> None:
    result = runner.invoke(policy_app, ["check", "--file", str(policy_file), "--principal", "alice", *args])
    assert result.exit_code == 2
    assert message in error_line(result)


def test_policy_check_with_an_invalid_or_missing_policy_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("roles:\n  ops: [instance:Fly]\n")
    args = ["--principal", "a", "--action", "status", "--resource", "instance:x"]
    result = runner.invoke(policy_app, ["check", "--file", str(bad), *args])
    assert result.exit_code == 2 and "unknown verb or operation 'Fly'" in error_line(result)
    result = runner.invoke(policy_app, ["check", "--file", str(tmp_path / "nope.yaml"), *args])
    assert result.exit_code == 2 and "no such file" in error_line(result)


# --------------------------------------------------------------------------- policy validate


def test_policy_validate_a_valid_file(runner: CliRunner, policy_file: Path) -> None:
    result = runner.invoke(policy_app, ["validate", str(policy_file)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{policy_file}: valid (1 role(s), 1 binding(s), 2 grant(s))"


def test_policy_validate_lists_every_problem_in_one_error_line(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("roles:\n  ops: [instance:Fly]\nbindings:\n  acme:\n    alice: [opz]\nextra: 1\n")
    result = runner.invoke(policy_app, ["validate", str(bad)])
    assert result.exit_code == 1
    line = error_line(result)
    assert "(3 problems)" in line
    for part in ("roles.ops[0]", "bindings.acme.alice[0]: unknown role 'opz'", "extra: unknown field"):
        assert part in line
