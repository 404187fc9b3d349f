"""Engine group membership settings: defaults for fast takeover, dev tuning, static identity, validation."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kflow.config import ConfigError, EngineConfig, load_config


def test_engines_default_to_a_short_session_with_frequent_heartbeats():
    conf = EngineConfig().group_conf()
    assert conf == {"session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000, "max.poll.interval.ms": 300_000}


def test_dev_tuning_fills_only_what_was_not_set_and_static_membership_uses_the_engine_id():
    conf = EngineConfig(dev_tuning=True, group_session_timeout_ms=9000, static_membership=True,
                        engine_id="kflow-engine-0").group_conf()
    assert conf == {"session.timeout.ms": 9000, "heartbeat.interval.ms": 500, "max.poll.interval.ms": 20_000,
                    "group.instance.id": "engine-kflow-engine-0"}


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("KFLOW_GROUP_SESSION_TIMEOUT_MS", "6000")
    monkeypatch.setenv("KFLOW_GROUP_HEARTBEAT_INTERVAL_MS", "600")
    conf = load_config(EngineConfig).group_conf()
    assert conf["session.timeout.ms"] == 6000 and conf["heartbeat.interval.ms"] == 600


def test_the_kip848_protocol_leaves_session_timing_to_the_broker(monkeypatch):
    monkeypatch.setenv("KFLOW_KAFKA_GROUP_PROTOCOL", "consumer")
    assert EngineConfig().group_conf() == {"max.poll.interval.ms": 300_000}


@pytest.mark.parametrize("settings, message", [
    ({"group_heartbeat_interval_ms": 5000},
     "KFLOW_GROUP_HEARTBEAT_INTERVAL_MS: expected at most a third of KFLOW_GROUP_SESSION_TIMEOUT_MS (10000 ms), "
     "but got 5000 ms"),
    ({"group_max_poll_interval_ms": 5000},
     "KFLOW_GROUP_MAX_POLL_INTERVAL_MS: expected at least KFLOW_GROUP_SESSION_TIMEOUT_MS (10000 ms), but got 5000 ms"),
])
def test_inconsistent_group_settings_are_a_precise_start_up_error(settings, message):
    with pytest.raises(ConfigError) as err:
        load_config(EngineConfig, **settings)
    assert message in str(err.value)


def test_bench_offers_the_failover_measurement():
    from kflow.cli import app

    out = CliRunner().invoke(app, ["bench", "--help"], terminal_width=200).output
    assert "--failover" in out
