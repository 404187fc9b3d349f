"""Webhook subscriptions end to end: a real engine writes state changes, a real HTTP service receives them.

The endpoints are routes of the test's HTTP service that answer per delivery id (fail the first
attempts, or fail until told otherwise) and record what they accepted. What should arrive is read
back from the state topic itself, so every check compares the deliveries with the records the
engine really wrote.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from kflow._cli.subscriptions import app
from kflow.config import KafkaConfig
from kflow.dlq import read_dlq
from kflow.readend import EndReader
from kflow.schemas.codec import decode_state
from kflow.streams.partitioner import partition_for
from kflow.subscriptions import (
    PUBLIC_FIELDS,
    SubscriptionRunner,
    apply_subscriptions,
    delete_subscription,
    parse_subscriptions,
    read_subscriptions,
    serve_operations,
    verify_signature,
)
from kflow.testing import assert_eventually
from tests.integration.conftest import PARTITIONS, Stack
from tests.integration.flows import chain
from tests.services import HttpService, Seen, http_service  # noqa: F401

SECRET_ENV = "KFLOW_TEST_SUBSCRIPTION_SECRET"
SECRET = "integration-secret"
FAST = {"initial": "10ms", "max": "40ms"}


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture(scope="module")
def kafka(stack: Stack) -> KafkaConfig:
    return stack.kafka_config(KafkaConfig)


@pytest.fixture
def runner(stack: Stack, kafka: KafkaConfig) -> Iterator[SubscriptionRunner]:
    """A delivery process in its own consumer group (so it starts at the state topic's end now)."""
    r = SubscriptionRunner(kafka, group_id=f"{stack.prefix}subs-{uuid.uuid4().hex[:6]}")
    r.start()
    try:
        assert r.ready(60), "the delivery process did not get its partitions within 60s"
        yield r
    finally:
        r.stop()
        assert r.error is None, r.error


@pytest.fixture
def operations(runner: SubscriptionRunner) -> Iterator[str]:
    """Base URL of the runner's operations endpoint."""
    server = serve_operations(runner, 0, host="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture
def declare(kafka: KafkaConfig) -> Iterator[Callable[..., list[str]]]:
    """Apply subscriptions (dicts as in a file); they are deleted again after the test."""
    applied: list[str] = []

    def apply(*subscriptions: dict[str, Any]) -> list[str]:
        parsed = parse_subscriptions(yaml.safe_dump({"subscriptions": list(subscriptions)}))
        apply_subscriptions(kafka, parsed)
        applied.extend(s.id for s in parsed)
        return [s.id for s in parsed]

    yield apply
    known = read_subscriptions(kafka)
    for sid in applied:
        if sid in known:
            delete_subscription(kafka, sid)


class Endpoint:
    """A route of the HTTP service: answers 500 to the first ``fail_first`` attempts of each delivery (to
    every attempt while ``failing``), 200 otherwise, and keeps the requests it accepted."""

    def __init__(self, service: HttpService, fail_first: int = 0, failing: bool = False) -> None:
        self.service, self.fail_first, self.failing = service, fail_first, failing
        self.path = f"/hooks/{uuid.uuid4().hex[:8]}"
        self.url = service.url + self.path
        self.accepted: list[Seen] = []
        service.routes[self.path] = self._answer

    def _answer(self, service: HttpService, seen: Seen) -> tuple[int, Any]:
        attempt = service.count(self.path + seen.headers["x-kflow-delivery"])
        if self.failing or attempt <= self.fail_first:
            return 500, {"error": "not now"}
        self.accepted.append(seen)
        return 200, {"ok": True}

    def attempts(self) -> list[Seen]:
        return self.service.seen(self.path)

    def seqs(self, instance: str) -> list[int]:
        """Seqs of the accepted changes of ``instance``, in the order they arrived."""
        return [s.body["seq"] for s in list(self.accepted) if s.body["instance_id"] == instance]


def subscription(sid: str, endpoint: Endpoint, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "url": endpoint.url, "secret_env": SECRET_ENV, **extra}


def deploy_chain(stack: Stack) -> str:
    name = f"subs.chain.{uuid.uuid4().hex[:6]}"
    stack.client.deploy(chain(name, n=2))
    return name


def run_instances(stack: Stack, workflow: str, ids: list[str]) -> None:
    for iid in ids:
        stack.client.start(workflow, 1, id=iid)
    for iid in ids:
        assert stack.client.result(iid, timeout=60) == 3


def state_records(kafka: KafkaConfig, ids: list[str]) -> dict[str, list[tuple[int, int, dict[str, Any]]]]:
    """Per instance: ``(partition, offset, decoded record)`` of its records on the state topic, in order."""
    out: dict[str, list[tuple[int, int, dict[str, Any]]]] = {iid: [] for iid in ids}
    with EndReader(kafka.consumer_conf(f"test-state-{uuid.uuid4().hex[:6]}")) as reader:
        for m in reader.read(kafka.names.state, timeout=30):
            key = (m.key() or b"").decode()
            if key in out and m.value() is not None:
                out[key].append((m.partition(), m.offset(), decode_state(m.value())))
    return out


def finished_past(runner: SubscriptionRunner, records: dict[str, list[tuple[int, int, dict[str, Any]]]]) -> bool:
    """Whether every lane of the runner has finished every one of ``records`` (delivered or not)."""
    positions = runner.positions()
    return all(positions.get(p, 0) > offset for recs in records.values() for p, offset, _ in recs)


def raw_body(seen: Seen) -> bytes:
    """The bytes that were POSTed: the service parsed them, and kflow sends compact JSON."""
    return json.dumps(seen.body, separators=(",", ":"), ensure_ascii=False).encode()


def wait_for_table(runner: SubscriptionRunner, ids: list[str], present: bool = True) -> None:
    assert_eventually(lambda: all((sid in runner.subscriptions) == present for sid in ids), timeout=30,
                      msg=f"subscriptions {ids} {'loaded' if present else 'deleted'} by the running process")


def test_every_change_arrives_in_order_signed_through_an_endpoint_that_fails_first(
        stack, kafka, declare, runner, operations, http_service):  # noqa: F811
    endpoint = Endpoint(http_service, fail_first=2)
    workflow = deploy_chain(stack)
    (sid,) = declare(subscription(f"ordered-{uuid.uuid4().hex[:6]}", endpoint, max_attempts=5, backoff=FAST,
                                  filter={"workflows": [workflow]}))
    wait_for_table(runner, [sid])
    ids = [f"subs-a-{uuid.uuid4().hex[:6]}", f"subs-b-{uuid.uuid4().hex[:6]}"]
    run_instances(stack, workflow, ids)
    records = state_records(kafka, ids)
    expected = {iid: [rec["seq"] for _, _, rec in recs] for iid, recs in records.items()}
    assert all(len(seqs) >= 2 for seqs in expected.values()), expected  # started ... completed

    assert_eventually(lambda: all(set(expected[i]) <= set(endpoint.seqs(i)) for i in ids), timeout=60,
                      msg="every state change delivered")
    for iid in ids:
        got = endpoint.seqs(iid)
        assert got == sorted(set(got)), f"{iid}: out of order or repeated: {got}"
        assert got == expected[iid]
    total = sum(len(s) for s in expected.values())
    for seen in endpoint.accepted:
        assert tuple(seen.body) == PUBLIC_FIELDS
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["x-kflow-subscription"] == sid
        assert verify_signature(raw_body(seen), SECRET, seen.headers["x-kflow-signature"]), seen.headers
        assert not verify_signature(raw_body(seen), "another-secret", seen.headers["x-kflow-signature"])
    final = {s.body["instance_id"]: s.body for s in endpoint.accepted if s.body["status"] == "COMPLETED"}
    assert {iid: (b["result"], b["workflow"], b["error"]) for iid, b in final.items()} == {
        iid: (3, workflow, None) for iid in ids}

    # three attempts per delivery (500, 500, 200), all under one delivery id; one id per change
    by_delivery: dict[str, int] = {}
    for seen in endpoint.attempts():
        by_delivery[seen.headers["x-kflow-delivery"]] = by_delivery.get(seen.headers["x-kflow-delivery"], 0) + 1
    assert len(by_delivery) == total and set(by_delivery.values()) == {3}

    assert httpx.get(f"{operations}/readyz", timeout=5).status_code == 200
    doc = assert_eventually(lambda: _delivered(operations, sid, total), timeout=10)
    assert {(e["outcome"], e["attempts"], e["http_status"]) for e in doc["deliveries"]} == {("delivered", 3, 200)}
    assert {(e["instance_id"], e["seq"]) for e in doc["deliveries"]} == {
        (iid, seq) for iid, seqs in expected.items() for seq in seqs}
    assert doc["url"] == endpoint.url and doc["secret_env"] == SECRET_ENV and SECRET not in json.dumps(doc)
    assert REGISTRY.get_sample_value("kflow_subscription_deliveries_total",
                                     {"subscription": sid, "outcome": "delivered"}) == total


def _delivered(operations: str, sid: str, count: int) -> dict[str, Any]:
    doc = httpx.get(f"{operations}/subscriptions", timeout=5).json()
    (mine,) = [s for s in doc["subscriptions"] if s["id"] == sid]
    assert len(mine["deliveries"]) == count, mine["deliveries"]
    return mine


def test_a_filter_delivers_only_the_matching_changes(stack, kafka, declare, runner, http_service):  # noqa: F811
    only, every = Endpoint(http_service), Endpoint(http_service)
    shipped, other = deploy_chain(stack), deploy_chain(stack)
    tag = uuid.uuid4().hex[:6]
    sids = declare(subscription(f"only-{tag}", only, filter={"workflows": [shipped], "statuses": ["COMPLETED"]}),
                   subscription(f"every-{tag}", every, filter={"workflows": [shipped, other]}))
    wait_for_table(runner, sids)
    mine, theirs = f"subs-f-{tag}", f"subs-g-{tag}"
    run_instances(stack, shipped, [mine])
    run_instances(stack, other, [theirs])
    records = state_records(kafka, [mine, theirs])
    assert_eventually(lambda: finished_past(runner, records), timeout=60, msg="every lane past the instances' records")

    assert every.seqs(mine) == [r["seq"] for _, _, r in records[mine]]
    assert every.seqs(theirs) == [r["seq"] for _, _, r in records[theirs]]
    (completed,) = [r for _, _, r in records[mine] if r["status"] == "COMPLETED"]
    assert [(s.body["instance_id"], s.body["status"], s.body["seq"]) for s in only.accepted] == [
        (mine, "COMPLETED", completed["seq"])]
    assert len(only.attempts()) == 1


def test_an_endpoint_that_always_fails_dead_letters_after_max_attempts_and_delivery_goes_on(
        stack, kafka, declare, runner, http_service):  # noqa: F811
    endpoint = Endpoint(http_service, failing=True)
    workflow = deploy_chain(stack)
    tag = uuid.uuid4().hex[:6]
    (sid,) = declare(subscription(f"broken-{tag}", endpoint, max_attempts=2, backoff=FAST,
                                  filter={"workflows": [workflow]}))
    wait_for_table(runner, [sid])
    first = f"subs-d-{tag}"
    # the second instance shares the first one's partition, hence its lane
    later = next(i for i in (f"subs-e-{tag}-{n}" for n in range(1000))
                 if partition_for(i, PARTITIONS) == partition_for(first, PARTITIONS))
    run_instances(stack, workflow, [first])
    lost = state_records(kafka, [first])[first]

    def dead_letters() -> list[Any]:
        found = [r for r in read_dlq(kafka) if r.reason.startswith(f"subscription '{sid}'")]
        assert len(found) == len(lost), found
        return found

    letters = assert_eventually(dead_letters, timeout=60, msg="every change of the first instance dead-lettered")
    assert sorted((r.original_topic, r.original_partition, r.original_offset) for r in letters) == sorted(
        (kafka.names.state, p, o) for p, o, _ in lost)
    assert all(f"POST {endpoint.url} failed 2 time(s); last: HTTP 500" in r.reason for r in letters)
    assert sorted(decode_state(r.value)["seq"] for r in letters) == [rec["seq"] for _, _, rec in lost]
    assert len(endpoint.attempts()) == 2 * len(lost) and not endpoint.accepted

    endpoint.failing = False
    run_instances(stack, workflow, [later])
    expected = [rec["seq"] for _, _, rec in state_records(kafka, [later])[later]]
    assert_eventually(lambda: endpoint.seqs(later) == expected, timeout=60, msg="later changes still delivered")
    outcomes = [("dead_lettered", 2, 500)] * len(lost) + [("delivered", 1, 200)] * len(expected)
    assert_eventually(lambda: [(e["outcome"], e["attempts"], e["http_status"])
                               for e in reversed(runner.log.entries(sid))] == outcomes, timeout=10)
    assert REGISTRY.get_sample_value("kflow_subscription_deliveries_total",
                                     {"subscription": sid, "outcome": "dead_lettered"}) == len(lost)


def test_subscriptions_applied_and_deleted_while_running_take_effect(
        stack, kafka, runner, operations, http_service, tmp_path: Path):  # noqa: F811
    endpoint = Endpoint(http_service)
    workflow = deploy_chain(stack)
    sid = f"live-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "subscriptions.yaml"
    path.write_text(yaml.safe_dump({"subscriptions": [subscription(sid, endpoint, filter={"workflows": [workflow]})]}))
    cli = CliRunner()
    where = ["--bootstrap", stack.bootstrap, "--prefix", stack.prefix]

    result = cli.invoke(app, ["apply", str(path), *where])
    assert result.exit_code == 0, result.output
    assert f"applied 1 subscription(s): {sid}" in result.output
    served = lambda: {s["id"] for s in httpx.get(f"{operations}/subscriptions").json()["subscriptions"]}  # noqa: E731
    assert_eventually(lambda: sid in served(), timeout=30, msg="the running process serves the new subscription")
    listed = cli.invoke(app, ["list", "--json", *where])
    assert listed.exit_code == 0 and json.loads(listed.output.splitlines()[0])["url"] == endpoint.url

    before = f"subs-l-{uuid.uuid4().hex[:6]}"
    run_instances(stack, workflow, [before])
    expected = [rec["seq"] for _, _, rec in state_records(kafka, [before])[before]]
    assert_eventually(lambda: endpoint.seqs(before) == expected, timeout=60, msg="delivered to the new subscription")

    result = cli.invoke(app, ["delete", sid, *where])
    assert result.exit_code == 0, result.output
    wait_for_table(runner, [sid], present=False)
    after = f"subs-m-{uuid.uuid4().hex[:6]}"
    run_instances(stack, workflow, [after])
    records = state_records(kafka, [after])
    assert_eventually(lambda: finished_past(runner, records), timeout=60, msg="the runner past the records")
    assert endpoint.seqs(after) == [] and not [s for s in endpoint.attempts() if s.body["instance_id"] == after]
    again = cli.invoke(app, ["delete", sid, *where])
    assert again.exit_code == 1 and f"no subscription '{sid}'" in again.output


def test_an_invalid_file_is_refused_and_nothing_is_applied(stack, kafka, http_service, tmp_path: Path):  # noqa: F811
    endpoint = Endpoint(http_service)
    tag = uuid.uuid4().hex[:6]
    path = tmp_path / "subscriptions.yaml"
    path.write_text(yaml.safe_dump({"subscriptions": [
        subscription(f"fine-{tag}", endpoint),
        {"id": f"ftp-{tag}", "url": "ftp://files.example.com/in", "secret_env": SECRET_ENV},
        subscription(f"status-{tag}", endpoint, filter={"statuses": ["DONE"]}),
        {"id": f"nosecret-{tag}", "url": endpoint.url, "secret_env": "KFLOW_TEST_UNSET_SECRET"},
    ]}))
    result = CliRunner().invoke(app, ["apply", str(path), "--bootstrap", stack.bootstrap, "--prefix", stack.prefix])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: invalid subscriptions file:")
    assert f"subscription 'ftp-{tag}': url: expected an http:// or https:// URL" in line
    assert f"subscription 'status-{tag}': filter.statuses.0: unknown status 'DONE'" in line
    assert f"subscription 'nosecret-{tag}': secret_env: environment variable KFLOW_TEST_UNSET_SECRET is not set" in line
    assert not {sid for sid in read_subscriptions(kafka) if sid.endswith(tag)}


def test_a_restarted_process_redelivers_what_it_had_not_finished(stack, kafka, declare, http_service):  # noqa: F811
    endpoint = Endpoint(http_service, failing=True)
    workflow = deploy_chain(stack)
    tag = uuid.uuid4().hex[:6]
    (sid,) = declare(subscription(f"restart-{tag}", endpoint, max_attempts=100, backoff=FAST,
                                  filter={"workflows": [workflow]}))
    group = f"{stack.prefix}subs-restart-{tag}"
    first = SubscriptionRunner(kafka, group_id=group)
    first.start()
    try:
        assert first.ready(60)
        wait_for_table(first, [sid])
        iid = f"subs-r-{tag}"
        run_instances(stack, workflow, [iid])
        assert_eventually(lambda: endpoint.attempts(), timeout=30, msg="the first process is retrying")
    finally:
        first.stop()
    assert first.error is None and not endpoint.accepted

    endpoint.failing = False
    second = SubscriptionRunner(kafka, group_id=group)
    second.start()
    try:
        assert second.ready(60)
        expected = [rec["seq"] for _, _, rec in state_records(kafka, [iid])[iid]]
        assert_eventually(lambda: endpoint.seqs(iid) == expected, timeout=60, msg="redelivered after the restart")
    finally:
        second.stop()
    assert second.error is None
