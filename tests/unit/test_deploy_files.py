"""The files under ``deploy/`` are checked with real tools and against the metrics the code exports.

hadolint lints the Dockerfile, kubernetes-validate checks the manifests against the Kubernetes
OpenAPI schemas (strict: unknown fields fail), check-jsonschema validates the compose file against
the compose specification it ships, and every ``kflow_*`` metric named by an alert rule or a
dashboard panel must be one the code registers in ``prometheus_client.REGISTRY`` — renaming a
metric in code without renaming it in the dashboard fails here.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client import REGISTRY

from tests.docs import page

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
METRIC = re.compile(r"\bkflow_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("_count", "_sum", "_created"), "info": ("_info",)}


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


def exported_metric_names() -> set[str]:
    """Every sample name the code can export: import each kflow module that uses prometheus_client."""
    for path in sorted((ROOT / "kflow").rglob("*.py")):
        if "prometheus_client" in path.read_text(encoding="utf-8"):
            rel = path.relative_to(ROOT).with_suffix("")
            importlib.import_module(".".join(p for p in rel.parts if p != "__init__"))
    names: set[str] = set()
    for collector in list(REGISTRY._collector_to_names):  # every registered collector, even without samples yet
        for family in collector.describe() if hasattr(collector, "describe") else collector.collect():
            if family.name.startswith("kflow_"):
                names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def test_dockerfile_passes_hadolint():
    result = _run(_tool("hadolint"), "--failure-threshold", "info", str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_kflow_as_non_root_from_pinned_dependencies():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) >= 2 and all(s.startswith("python:3.11-slim") for s in stages), stages
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r'^ENTRYPOINT \["kflow"\]', text, re.M)
    assert re.search(r"^HEALTHCHECK .*kflow\._http", text, re.M)
    assert "-r deploy/requirements.txt" in text


def test_lock_pins_every_runtime_dependency_exactly():
    pins = {}
    for line in (DEPLOY / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
            pins[req.name.lower().replace("_", "-")] = next(iter(req.specifier)).version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    deps = list(project["dependencies"])  # the image runs every role: the dependencies and every extra of `all`
    for named in Requirement(extras["all"][0]).extras:
        deps += extras[named]
    for dep in deps:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in deploy/requirements.txt: run python deploy/lock.py"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req.specifier}"


def _manifests() -> list[Path]:
    return sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def test_kubernetes_manifests_validate():
    result = _run(_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, *map(str, _manifests()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") >= 9


def test_kubernetes_layout():
    docs = [d for p in _manifests() for d in yaml.safe_load_all(p.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "kflow-engine"), ("Service", "kflow-engine"), ("PodDisruptionBudget", "kflow-engine"),
            ("Deployment", "kflow-worker"), ("HorizontalPodAutoscaler", "kflow-worker"),
            ("Deployment", "kflow-console"), ("Service", "kflow-console"), ("ConfigMap", "kflow-config")} <= kinds
    engine = next(d for d in docs if d["kind"] == "StatefulSet")
    assert engine["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    container = engine["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "KFLOW_ENGINE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]
    kustomized = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert sorted(kustomized) == sorted(p.name for p in _manifests())


def test_compose_file_follows_the_compose_specification():
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_whole_stack():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    engines = [n for n, s in services.items() if s.get("command", [None])[0] == "engine"]
    assert len(engines) == 2
    assert {services[n]["environment"]["KFLOW_ENGINE_ID"] for n in engines} == set(engines)
    for name in ("worker", "console", "connectors", "mosquitto", "postgres", "prometheus", "grafana"):
        assert name in services, name
    for path in ("connectors.yaml", "mosquitto/mosquitto.conf", "prometheus/prometheus.yml", "prometheus/alerts.yml"):
        assert (DEPLOY / path).exists(), path
    scraped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    jobs = {j["job_name"]: j for j in scraped}
    assert jobs["kflow-engine"]["static_configs"][0]["targets"] == [f"{n}:9464" for n in engines]
    assert {"kflow-worker", "kflow-connectors", "kflow-console"} <= set(jobs)


ALERTS = {"KflowEngineDown", "KflowConsumerLagGrowing", "KflowDLQGrowing", "KflowWorkflowFailureRate",
          "KflowActivityRetryStorm", "KflowTimersLate"}


def _rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_cover_the_required_alerts_with_runbooks():
    rules = _rules()
    assert ALERTS <= {r["alert"] for r in rules}
    readme = page("operations")
    for r in rules:
        assert r["expr"].strip() and r["labels"]["severity"] in ("warning", "critical")
        anchor = r["annotations"]["runbook"].split("#", 1)[1]
        assert r["annotations"]["runbook"].startswith("docs/operations.md#"), r["annotations"]["runbook"]
        assert f'<a id="{anchor}"></a>' in readme, f"docs/operations.md has no runbook for {r['alert']}"


def test_alerts_and_dashboard_use_only_metrics_the_code_exports():
    exported = exported_metric_names()
    assert {"kflow_workflows_started_total", "kflow_engine_timer_lateness_seconds_bucket",
            "kflow_worker_inflight", "kflow_consumer_lag"} <= exported
    used: dict[str, set[str]] = {}
    for r in _rules():
        for m in METRIC.findall(r["expr"]):
            used.setdefault(m, set()).add(f"alert {r['alert']}")
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "kflow.json").read_text())
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for title, expr in exprs:
        for m in METRIC.findall(expr):
            used.setdefault(m, set()).add(f"panel {title!r}")
    unknown = {m: sorted(where) for m, where in used.items() if m not in exported}
    assert not unknown, f"metrics not exported by the code: {unknown}"


def test_readme_metrics_table_is_generated_and_complete():
    from kflow._config_doc import metrics_table

    table = metrics_table()
    assert table in page("operations"), "regenerate it: python -m kflow._config_doc metrics"
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exported_metric_names()}
    missing = sorted(f for f in families if f"| `{f}" not in table)
    assert not missing, f"add their modules to kflow._config_doc.METRIC_MODULES: {missing}"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.y*ml")))
def test_every_yaml_file_parses(path):
    assert list(yaml.safe_load_all((DEPLOY / path).read_text()))


# --------------------------------------------------------------------------- the outer wall and the keys


def _acls() -> list[dict[str, object]]:
    """The ACLs deploy/kafka-acls.sh adds, as the script itself prints them with DRY_RUN=1."""
    result = subprocess.run(["bash", str(DEPLOY / "kafka-acls.sh")], capture_output=True, text=True, timeout=60,
                            env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin", "PREFIX": "kflow.",
                                 "TRIGGER_SOURCES": "orders-in"})
    assert result.returncode == 0, result.stderr
    acls = []
    for line in result.stdout.splitlines():
        words = line.split()
        opts: dict[str, list[str]] = {}
        for i, w in enumerate(words):
            if w.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--"):
                opts.setdefault(w[2:], []).append(words[i + 1])
            elif w.startswith("--"):
                opts.setdefault(w[2:], [])
        acls.append({"user": opts["allow-principal"][0].removeprefix("User:"), "ops": set(opts["operation"]),
                     "topic": (opts.get("topic") or [None])[0], "group": (opts.get("group") or [None])[0],
                     "txn": (opts.get("transactional-id") or [None])[0],
                     "prefixed": opts.get("resource-pattern-type") == ["prefixed"]})
    return acls


def _allowed(acls: list[dict[str, object]], user: str, op: str, topic: str) -> bool:
    return any(a["user"] == user and op in a["ops"] and a["topic"] is not None  # type: ignore[operator]
               and (a["topic"] == topic or (a["prefixed"] and topic.startswith(str(a["topic"])))) for a in acls)


def test_kafka_acls_name_every_topic_and_give_each_principal_what_it_uses():
    from kflow.streams.topics import TopicNames, TopicSettings, topic_specs

    acls = _acls()
    names = TopicNames("kflow.")
    # every topic kflow creates (a queue's task topics included) is named by a read or write grant
    # of its own, not only by the prefix everyone may describe
    topics = [s.name for s in topic_specs(names, TopicSettings(), queues=["orders"])] + ["kflow.subscriptions"]
    named = [a for a in acls if a["topic"] not in (None, "kflow.") and {"Read", "Write"} & a["ops"]]  # type: ignore[operator]
    for topic in topics:
        assert any(_allowed([a], str(a["user"]), op, topic) for a in named for op in ("Read", "Write")), (
            f"no principal is granted {topic} by name")
    for user in ("kflow-worker", "kflow-connector", "kflow-trigger", "kflow-client", "kflow-visibility",
                 "kflow-operator"):
        assert _allowed(acls, user, "Write", names.commands), user
    assert _allowed(acls, "kflow-engine", "Read", names.commands)
    for topic in ("kflow.events", "kflow.state", "kflow.journal", "kflow.audit", "kflow.tasks.orders.p1"):
        assert _allowed(acls, "kflow-engine", "Write", topic), topic
    assert _allowed(acls, "kflow-worker", "Read", "kflow.tasks.orders")
    assert _allowed(acls, "kflow-trigger", "Read", "orders-in")
    # only the engine writes state and events; only the operator writes the policy
    assert {a["user"] for a in acls if a["topic"] in (names.state, names.events) and "Write" in a["ops"]} == {
        "kflow-engine"}
    assert {a["user"] for a in acls if a["topic"] == names.policies and "Write" in a["ops"]} == {"kflow-operator"}
    assert any(a["user"] == "kflow-engine" and a["txn"] == "kflow.engine-" and a["prefixed"] and "Write" in a["ops"]
               for a in acls)  # type: ignore[operator]
    assert any(a["user"] == "kflow-operator" and a["txn"] == "kflow.policy-apply" for a in acls)


def _containers() -> dict[str, dict]:
    docs = [d for p in _manifests() for d in yaml.safe_load_all(p.read_text()) if d]
    return {c["name"]: c for d in docs if d["kind"] in ("StatefulSet", "Deployment")
            for c in d["spec"]["template"]["spec"]["containers"]}


def _from_secret(container: dict, variable: str) -> str | None:
    """The Secret ``variable`` is read from in ``container``, or None."""
    for e in container.get("env", []):
        if e["name"] == variable:
            return e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
    return None


def test_kubernetes_turns_auth_on_and_reads_the_keys_from_secrets():
    docs = [d for p in _manifests() for d in yaml.safe_load_all(p.read_text()) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kflow-config")
    assert config["data"]["KFLOW_AUTH"] == "on"
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    containers = _containers()
    for name in ("engine", "console", "triggers"):
        assert _from_secret(containers[name], "KFLOW_JWT_SECRET") == "kflow-auth", name
    assert "KFLOW_JWT_SECRET" in secrets["kflow-auth"]["stringData"]
    assert _from_secret(containers["triggers"], "KFLOW_TOKEN") == "kflow-trigger"  # its own principal
    assert "KFLOW_TOKEN" in secrets["kflow-trigger"]["stringData"]
    # a key or token never appears in plain configuration
    for d in docs:
        if d["kind"] == "ConfigMap":
            assert not {"KFLOW_JWT_SECRET", "KFLOW_TOKEN", "KFLOW_SIGNING_KEY"} & set(d["data"]), d["metadata"]["name"]
    for name, c in containers.items():
        for e in c.get("env", []):
            if e["name"] in ("KFLOW_JWT_SECRET", "KFLOW_TOKEN", "KFLOW_SIGNING_KEY"):
                assert "value" not in e and _from_secret(c, e["name"]), f"{name} sets {e['name']} in plain text"
