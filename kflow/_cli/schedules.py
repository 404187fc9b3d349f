"""``kflow schedule``: cron and interval schedules that start workflow runs, fired by the engines."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, dump_json, fail, parse_json, setup_logging

if TYPE_CHECKING:
    from kflow.client import Client

__all__ = ["app"]

app = typer.Typer(
    help="Cron and interval schedules: start a workflow on a timetable, fired exactly once per scheduled time by "
         "the engine that owns the schedule. See docs/schedules.md.",
    no_args_is_help=True)

ScheduleId = Annotated[str, typer.Argument(metavar="ID", help="The schedule's name.")]
#: How long `create` waits to see the engine apply the schedule before saying it was only sent.
_APPLY_WAIT_S = 10.0


def _client(bootstrap: Optional[str], prefix: Optional[str], verbose: bool) -> Client:
    setup_logging(verbose)
    from kflow.client import Client

    return Client(bootstrap, topic_prefix=prefix)


def _line(record: dict[str, Any]) -> str:
    spec = record["spec"]
    when = f"cron '{spec['cron']}' {spec['timezone']}" if spec.get("cron") else f"every {spec['every_ms'] / 1000:g}s"
    state = f"paused ({record['note']})" if record.get("paused") and record.get("note") else (
        "paused" if record.get("paused") else "active")
    nxt = record.get("next_runs") or []
    return (f"{record['id']}  {spec['workflow']}  {when}  overlap={spec['overlap']}  {state}  "
            f"running={len(record.get('running') or [])}  next={nxt[0] if nxt else '-'}")


@app.command("create")
def create(
    schedule_id: ScheduleId,
    workflow: Annotated[str, typer.Option("--workflow", "-w", help="The workflow each run starts.")],
    cron: Annotated[Optional[str], typer.Option(
        "--cron", help="5-field cron expression (minute hour day-of-month month day-of-week) or @hourly, @daily, "
                       "@weekly, @monthly, @yearly; read in --timezone.")] = None,
    every: Annotated[Optional[str], typer.Option("--every", help="An interval instead of --cron: 30s, 5m, 1h, 1d.")] = None,
    input_json: Annotated[Optional[str], typer.Option("--input", help="The JSON input of every run.")] = None,
    version: Annotated[Optional[int], typer.Option("--version", help="Pin a workflow version (default: latest).")] = None,
    timezone: Annotated[str, typer.Option("--timezone", "--tz", help="IANA time zone of --cron, e.g. Europe/Berlin.")] = "UTC",
    jitter: Annotated[Optional[str], typer.Option("--jitter", help="Delay each run by a fixed pseudo-random offset below this, e.g. 30s.")] = None,
    start: Annotated[Optional[str], typer.Option("--start", help="No run before this instant (ISO 8601 with zone).")] = None,
    end: Annotated[Optional[str], typer.Option("--end", help="No run after this instant (ISO 8601 with zone).")] = None,
    overlap: Annotated[str, typer.Option(
        "--overlap", help="A run that is due while the previous one is still open: skip, buffer_one, allow_all, "
                          "cancel_other or terminate_other.")] = "skip",
    catchup_window: Annotated[Optional[str], typer.Option(
        "--catchup-window", help="After engine downtime, missed runs this recent are still started (default 1h).")] = None,
    update: Annotated[bool, typer.Option("--update", help="Replace the declaration of an existing schedule.")] = False,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Create schedule ID: start --workflow on --cron or --every.

    Each run's id is `ID:<scheduled time, UTC ISO 8601>`, so a crash or a replay never starts a
    time twice. An invalid cron expression or time zone is one error and nothing is sent. The
    command waits (up to 10s) for the engine to apply it and prints the next runs.

    Example: kflow schedule create nightly --workflow report --cron '0 2 * * *' --tz Europe/Berlin

    Example: kflow schedule create poll --workflow check --every 1m --overlap skip --input '{"url": "https://..."}'
    """
    from kflow.engine.schedules import ScheduleSpecError
    from kflow.model.errors import KflowError

    value = parse_json(input_json, "--input")
    with _client(bootstrap, prefix, verbose) as client:
        try:
            spec = client.create_schedule(schedule_id, workflow, cron=cron, every=every, input=value, version=version,
                                          timezone=timezone, jitter=jitter, start=start, end=end, overlap=overlap,
                                          catchup_window=catchup_window, replace=update)
        except ScheduleSpecError as exc:
            fail(str(exc))
        except KflowError as exc:
            fail(str(exc))
        deadline = time.monotonic() + _APPLY_WAIT_S
        while time.monotonic() < deadline:
            record = client.describe_schedule(schedule_id)
            if record is not None and record["spec"] == spec.to_dict():
                typer.echo(f"{'updated' if update else 'created'} schedule {schedule_id}; next runs: "
                           f"{', '.join(record['next_runs']) or 'none'}")
                return
            time.sleep(0.2)
        typer.echo(f"sent schedule {schedule_id}; no engine applied it within {_APPLY_WAIT_S:g}s (is one running?)")


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """List the schedules: workflow, timetable, overlap policy, paused or not, open runs, next run.

    Example: kflow schedule list
    """
    from kflow.streams.schedules import with_next_runs

    with _client(bootstrap, prefix, verbose) as client:
        table = client.schedules()
    now = int(time.time() * 1000)
    for sid in sorted(table):
        record = with_next_runs(table[sid], now, 1)
        typer.echo(dump_json(record) if as_json else _line(record))
    if not table and not as_json:
        typer.echo("no schedules")


@app.command("describe")
def describe(
    schedule_id: ScheduleId,
    count: Annotated[int, typer.Option("--next", min=1, max=100, help="How many next runs to show.")] = 5,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Show schedule ID as JSON: its declaration, paused and note, open and buffered runs, recent
    firings and the next scheduled times.

    Example: kflow schedule describe nightly --next 10
    """
    from kflow.streams.schedules import with_next_runs

    with _client(bootstrap, prefix, verbose) as client:
        record = client.schedules().get(schedule_id)
    if record is None:
        fail(f"no schedule '{schedule_id}'")
    typer.echo(dump_json(with_next_runs(record, int(time.time() * 1000), count)))


def _simple(action: str, schedule_id: str, bootstrap: Optional[str], prefix: Optional[str], verbose: bool,
            **kw: Any) -> None:
    from kflow.model.errors import KflowError

    with _client(bootstrap, prefix, verbose) as client:
        try:
            getattr(client, f"{action}_schedule")(schedule_id, **kw)
        except (KflowError, ValueError) as exc:
            fail(str(exc))


@app.command("pause")
def pause(
    schedule_id: ScheduleId,
    note: Annotated[str, typer.Option("--note", help="Why; shown by list and describe.")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Pause schedule ID: no run starts while it is paused, and the times it missed are not caught up.

    Example: kflow schedule pause nightly --note "warehouse migration"
    """
    _simple("pause", schedule_id, bootstrap, prefix, verbose, note=note)
    typer.echo(f"paused schedule {schedule_id}")


@app.command("unpause")
def unpause(
    schedule_id: ScheduleId,
    note: Annotated[str, typer.Option("--note", help="Why; shown by describe.")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Unpause schedule ID: it fires again from its next scheduled time after now.

    Example: kflow schedule unpause nightly
    """
    _simple("unpause", schedule_id, bootstrap, prefix, verbose, note=note)
    typer.echo(f"unpaused schedule {schedule_id}")


@app.command("trigger")
def trigger(
    schedule_id: ScheduleId,
    overlap: Annotated[Optional[str], typer.Option(
        "--overlap", help="Override the schedule's overlap policy for this run (e.g. allow_all).")] = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Start a run of schedule ID now (id `ID:<now>`), under its overlap policy.

    Example: kflow schedule trigger nightly --overlap allow_all
    """
    _simple("trigger", schedule_id, bootstrap, prefix, verbose, overlap=overlap)
    typer.echo(f"triggered schedule {schedule_id}")


@app.command("backfill")
def backfill(
    schedule_id: ScheduleId,
    start: Annotated[str, typer.Option("--start", help="First instant of the range (ISO 8601 with zone), inclusive.")],
    end: Annotated[str, typer.Option("--end", help="End of the range (ISO 8601 with zone), exclusive.")],
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Start one run per scheduled time of schedule ID in [--start, --end), at most 1000.

    Runs get the same ids as had they run on time, so times that already ran are not started again.

    Example: kflow schedule backfill nightly --start 2026-03-01T00:00:00Z --end 2026-03-08T00:00:00Z
    """
    _simple("backfill", schedule_id, bootstrap, prefix, verbose, start=start, end=end)
    typer.echo(f"backfill of schedule {schedule_id} sent for [{start}, {end})")


@app.command("delete")
def delete(
    schedule_id: ScheduleId,
    reason: Annotated[str, typer.Option("--reason", help="Recorded in the schedule's history.")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Delete schedule ID: no further runs start; runs already started go on.

    Example: kflow schedule delete nightly --reason "replaced by nightly-v2"
    """
    _simple("delete", schedule_id, bootstrap, prefix, verbose, reason=reason)
    typer.echo(f"deleted schedule {schedule_id}")
