"""``kflow batch``: apply one operation to every instance a visibility query selects, durably and rate-limited."""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, dump_json, fail, parse_json, setup_logging

if TYPE_CHECKING:
    from kflow.batch import BatchLog, BatchRecord
    from kflow.client import Client

__all__ = ["app"]

app = typer.Typer(
    help="Batch operations: signal, cancel, terminate, suspend, resume or retry every instance a --where query "
         "selects. A batch is durable (its own id, status and per-instance outcomes on the batches topic): an "
         "interrupted one is continued with `kflow batch continue ID` and acts on each instance once. "
         "See docs/batch.md.",
    no_args_is_help=True)

Where = Annotated[str, typer.Option(
    "--where", "-q", metavar="QUERY",
    help="Which instances: NAME=VALUE terms joined by AND. Names: status (e.g. RUNNING,FAILED), workflow, version, "
         "tenant, started_after, started_before, closed_after, closed_before (epoch ms or ISO 8601), id_prefix, "
         "search.NAME (a search attribute). Quote values with spaces.")]
Rate = Annotated[str, typer.Option("--rate", metavar="N/s", help="Most commands sent per second (50/s, 600/m).")]
Reason = Annotated[str, typer.Option("--reason", "-r", metavar="TEXT",
                                     help="Why; recorded in each instance's history with the batch id.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show how many instances match (and the first ones); "
                                                        "create and send nothing.")]
MaxInstances = Annotated[int, typer.Option("--max", min=1, help="Refuse the batch if more instances than this match.")]
AnswerTimeout = Annotated[float, typer.Option(
    "--answer-timeout", min=0.1, metavar="SECONDS",
    help="How long to wait for the engine's answer to each command; an instance without one is 'unanswered' "
         "and `kflow batch continue` sends to it again.")]
CheckpointEvery = Annotated[int, typer.Option(
    "--checkpoint-every", min=1, metavar="N",
    help="Record progress on the batches topic every N outcomes (and every second).")]
Api = Annotated[Optional[str], typer.Option(
    "--api", metavar="URL", envvar="KFLOW_API",
    help="Visibility API that resolves --where (KFLOW_API); without one the state topic is read and filtered.")]
BatchId = Annotated[str, typer.Argument(metavar="ID", help="The batch id (kflow batch list shows them).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


# --------------------------------------------------------------------------- helpers


def _client(bootstrap: Optional[str], prefix: Optional[str], verbose: bool) -> Client:
    setup_logging(verbose)
    from kflow.client import Client

    return Client(bootstrap, topic_prefix=prefix)


def _who() -> str:
    """Who creates a batch, as recorded with it: the login name."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment
        return "unknown"


def _summary(rec: BatchRecord) -> str:
    h, c = rec.header, rec.counts()
    return (f"batch {rec.id} {h.get('status')}: {h.get('operation')} of {len(rec.ids)} instance(s) "
            f"({h.get('where')}); {c['applied']} applied, {c['rejected']} rejected, {c['dead-lettered']} "
            f"dead-lettered, {c['unanswered']} unanswered, {c['pending']} pending")


def _run(client: Client, log: BatchLog, batch_id: str, rate: Optional[float], answer_timeout: float,
         checkpoint_every: int, as_json: bool) -> None:
    """Run the batch with a progress bar on stderr; print the summary and the instances not applied."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kflow.batch import BatchRunner

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=False) as bar:
        task = bar.add_task(batch_id, total=None, counts="")

        def progress(rec: BatchRecord) -> None:
            c = rec.counts()
            bar.update(task, total=len(rec.ids), completed=len(rec.ids) - c["pending"],
                       counts=f"applied {c['applied']}  rejected {c['rejected']}  unanswered {c['unanswered']}")

        runner = BatchRunner(client, log, rate=rate, answer_timeout=answer_timeout,
                             checkpoint_every=checkpoint_every, on_progress=progress)
        try:
            rec = runner.run(batch_id)
        except KeyboardInterrupt:
            fail(f"interrupted: batch {batch_id} stopped; continue it with `kflow batch continue {batch_id}`", 130)
    _finish(rec, as_json)


def _finish(rec: BatchRecord, as_json: bool) -> None:
    not_applied = [(iid, rec.outcomes.get(iid)) for iid in rec.ids
                   if rec.outcomes.get(iid) is None or rec.outcomes[iid].result != "applied"]
    if as_json:
        typer.echo(dump_json({**rec.header, "counts": rec.counts()}))
    else:
        typer.echo(_summary(rec))
        for iid, out in not_applied[:20]:
            typer.echo(f"  {iid}: {_describe(out)}")
        if len(not_applied) > 20:
            typer.echo(f"  ... and {len(not_applied) - 20} more: kflow batch report {rec.id}")
    status = rec.header.get("status")
    if status == "CANCELLED":
        fail(f"batch {rec.id} was stopped before every instance was sent to")
    if not_applied:
        fail(f"{len(not_applied)} of {len(rec.ids)} instance(s) were not applied (kflow batch report {rec.id})")


def _describe(out: Any) -> str:
    if out is None:
        return "pending (not sent yet)"
    text = out.result + (f" {out.code}" if out.code else "") + (f": {out.reason}" if out.reason else "")
    return text + (" (by an earlier run)" if out.earlier else "")


def _create_and_run(operation: str, where: str, args: dict[str, Any], rate: str, dry_run: bool, max_instances: int,
                    answer_timeout: float, checkpoint_every: int, api: Optional[str], as_json: bool,
                    bootstrap: Optional[str], prefix: Optional[str], verbose: bool) -> None:
    from kflow.batch import BatchLog, new_batch, parse_rate, parse_where, select_from_api, select_from_state
    from kflow.batch.runner import check_operation

    query = parse_where(where)  # a bad query, rate or argument is one error, before anything is read or sent
    per_second = parse_rate(rate)
    check_operation(operation, args)
    with _client(bootstrap, prefix, verbose) as client:
        ids = (select_from_api(api, query, max_instances) if api
               else select_from_state(client.config, query, max_instances))
        if dry_run:
            typer.echo(f"{len(ids)} instance(s) match {query.text()!r}; {operation} would be sent to each "
                       f"at {per_second:g}/s (nothing was created)")
            for iid in ids[:20]:
                typer.echo(f"  {iid}")
            if len(ids) > 20:
                typer.echo(f"  ... and {len(ids) - 20} more")
            return
        log = BatchLog(client.config)
        try:
            rec = new_batch(log, operation, query, ids, args, per_second, _who())
            typer.echo(f"batch {rec.id}: {operation} of {len(ids)} instance(s) at {per_second:g}/s; if it is "
                       f"interrupted, `kflow batch continue {rec.id}` carries on", err=True)
            _run(client, log, rec.id, None, answer_timeout, checkpoint_every, as_json)
        finally:
            log.close()


# --------------------------------------------------------------------------- the operations


@app.command("signal")
def signal(
    where: Where,
    name: Annotated[str, typer.Option("--name", "-n", help="The signal name.")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", metavar="JSON",
                                                help="The signal data, JSON (or @file).")] = None,
    rate: Rate = "50/s", dry_run: DryRun = False, max_instances: MaxInstances = 100_000,
    answer_timeout: AnswerTimeout = 30.0, checkpoint_every: CheckpointEvery = 100, api: Api = None,
    as_json: AsJson = False, bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False,
) -> None:
    """Send signal --name (with --data) to every instance --where selects.

    Each instance gets the signal once, even when the batch is interrupted and continued: the
    signal's id is derived from the batch and the instance, and the engine drops a repeat. A
    closed instance rejects it; that instance's error is reported and the others go on.

    Example: kflow batch signal --where "workflow=order AND status=RUNNING" --name approve --data '{"by": "ops"}'
    """
    _create_and_run("signal", where, {"name": name, "data": parse_json(data, "--data")}, rate, dry_run, max_instances,
                    answer_timeout, checkpoint_every, api, as_json, bootstrap, prefix, verbose)


def _reason_command(operation: str, summary: str, example: str) -> None:
    def command(
        where: Where, reason: Reason = "", rate: Rate = "50/s", dry_run: DryRun = False,
        max_instances: MaxInstances = 100_000, answer_timeout: AnswerTimeout = 30.0,
        checkpoint_every: CheckpointEvery = 100, api: Api = None, as_json: AsJson = False,
        bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False,
    ) -> None:
        _create_and_run(operation, where, {"reason": reason}, rate, dry_run, max_instances, answer_timeout,
                        checkpoint_every, api, as_json, bootstrap, prefix, verbose)

    command.__doc__ = f"""{summary}

    The instances are selected once, when the batch is created; each outcome (applied, or the
    engine's rejection with its reason) is recorded and shown by `kflow batch report ID`. An
    instance the operation does not fit (a closed one, say) is rejected by the engine, nothing
    is applied to it, and the batch goes on with the others.

    Example: {example}
    """
    app.command(operation)(command)


_reason_command("cancel", "Cancel every instance --where selects (compensations run first, as for `kflow cancel`).",
                'kflow batch cancel --where "workflow=order AND started_before=2024-05-01" --reason "recall"')
_reason_command("terminate", "Terminate every instance --where selects, with no cleanup (as `kflow terminate`).",
                'kflow batch terminate --where "search.customer=acme AND status=RUNNING" --rate 10/s')
_reason_command("suspend", "Suspend every instance --where selects (as `kflow suspend`); closed ones are rejected.",
                'kflow batch suspend --where "workflow=payout AND status=RUNNING" --reason "bank outage"')
_reason_command("resume", "Resume every suspended instance --where selects (as `kflow resume`).",
                'kflow batch resume --where "workflow=payout AND status=SUSPENDED"')


@app.command("retry")
def retry(
    where: Where,
    from_step: Annotated[Optional[str], typer.Option(
        "--from", metavar="STEP", help="Top-level step to re-open at (default: where each failed).")] = None,
    input_patch: Annotated[Optional[str], typer.Option(
        "--input-patch", metavar="JSON", help="JSON object merged into each instance's variables.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Also re-open CANCELLED and TERMINATED instances.")] = False,
    reason: Reason = "", rate: Rate = "50/s", dry_run: DryRun = False, max_instances: MaxInstances = 100_000,
    answer_timeout: AnswerTimeout = 30.0, checkpoint_every: CheckpointEvery = 100, api: Api = None,
    as_json: AsJson = False, bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False,
) -> None:
    """Retry every failed spec instance --where selects (as `kflow retry`).

    An instance that cannot be retried (not FAILED, a code workflow, an unknown step) is rejected
    by the engine with the reason, and nothing is applied to it.

    Example: kflow batch retry --where "workflow=order AND status=FAILED AND closed_after=2024-05-01" --rate 5/s
    """
    args = {"from_step": from_step, "input_patch": parse_json(input_patch, "--input-patch"), "force": force,
            "reason": reason}
    _create_and_run("retry", where, args, rate, dry_run, max_instances, answer_timeout, checkpoint_every, api,
                    as_json, bootstrap, prefix, verbose)


# --------------------------------------------------------------------------- managing batches


@app.command("list")
def list_batches(as_json: AsJson = False, bootstrap: Bootstrap = None, prefix: Prefix = None,
                 verbose: Verbose = False) -> None:
    """List batches, newest first, with their status and counts.

    Example: kflow batch list
    """
    from kflow.batch import BatchLog

    with _client(bootstrap, prefix, verbose) as client:
        headers = BatchLog(client.config).headers()
    for h in headers:
        if as_json:
            typer.echo(dump_json(h))
            continue
        c = h.get("counts") or {}
        typer.echo(f"{h['id']}  {h.get('status'):<11} {h.get('operation'):<9} {h.get('total')} instance(s)  "
                   f"applied={c.get('applied', 0)} rejected={c.get('rejected', 0)} "
                   f"pending={c.get('pending', h.get('total'))}  by {h.get('by')}  where {h.get('where')}")


@app.command("status")
def status(batch_id: BatchId, as_json: AsJson = False, bootstrap: Bootstrap = None, prefix: Prefix = None,
           verbose: Verbose = False) -> None:
    """Show one batch: its definition, status and counts per outcome.

    Example: kflow batch status b-1a2b3c4d5e6f
    """
    import time

    from kflow.batch import BatchLog, runner_alive

    with _client(bootstrap, prefix, verbose) as client:
        rec = BatchLog(client.config).load(batch_id)
    if as_json:
        typer.echo(dump_json({**rec.header, "counts": rec.counts()}))
        return
    typer.echo(_summary(rec))
    h = rec.header
    typer.echo(f"  created by {h.get('by')}, rate {h.get('rate'):g}/s, args {dump_json(h.get('args'))}, "
               f"runs {h.get('runs')}")
    if h.get("status") == "RUNNING" and not runner_alive(h, int(time.time() * 1000)):
        typer.echo(f"  its process ({h.get('runner')}) is gone: continue it with `kflow batch continue {rec.id}`")


@app.command("report")
def report(
    batch_id: BatchId,
    fmt: Annotated[Literal["table", "json"], typer.Option(
        "--format", "-f", help="A table, or json (one JSON object per instance).")] = "table",
    only: Annotated[Optional[Literal["applied", "rejected", "dead-lettered", "unanswered", "pending"]],
                    typer.Option("--only", help="Only the instances with this outcome.")] = None,
    bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False,
) -> None:
    """The outcome of every instance of a batch: applied, or why not (the engine's code and reason).

    Example: kflow batch report b-1a2b3c4d5e6f --only rejected --format json
    """
    from kflow.batch import BatchLog

    with _client(bootstrap, prefix, verbose) as client:
        rec = BatchLog(client.config).load(batch_id)
    rows = []
    for iid in rec.ids:
        out = rec.outcomes.get(iid)
        row = {"instance_id": iid, **(out.to_json() if out is not None else {"result": "pending"})}
        if only is None or row["result"] == only:
            rows.append(row)
    if fmt == "json":
        for row in rows:
            typer.echo(dump_json(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("instance", "outcome", "code", "reason", title=_summary(rec))
    for row in rows:
        style = "green" if row["result"] == "applied" else "red"
        table.add_row(row["instance_id"], f"[{style}]{row['result']}[/]", row.get("code", ""),
                      row.get("reason", "") + (" (earlier run)" if row.get("earlier") else ""))
    Console(soft_wrap=True).print(table)


@app.command("continue")
def continue_batch(
    batch_id: BatchId,
    rate: Annotated[Optional[str], typer.Option("--rate", metavar="N/s",
                                                help="Another rate for this run (default: the batch's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Continue even if the batch looks like it is still "
                                                        "running in another process.")] = False,
    answer_timeout: AnswerTimeout = 30.0, checkpoint_every: CheckpointEvery = 100, as_json: AsJson = False,
    bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False,
) -> None:
    """Continue an interrupted batch: send to every instance that has no final outcome yet.

    The same instances as when the batch was created, each acted on once: a command the
    interrupted run may already have sent is sent again with the same id, and the engine drops
    the repeat (a signal) or finds the instance already changed (the other operations, which the
    report then shows as applied by an earlier run). Instances that were 'unanswered' are sent to again.

    Example: kflow batch continue b-1a2b3c4d5e6f --rate 20/s
    """
    import time

    from kflow.batch import BatchLog, parse_rate, runner_alive

    per_second = parse_rate(rate) if rate is not None else None
    with _client(bootstrap, prefix, verbose) as client:
        log = BatchLog(client.config)
        try:
            rec = log.load(batch_id)
            status_ = rec.header.get("status")
            if status_ in ("COMPLETED", "CANCELLED"):
                typer.echo(_summary(rec))
                fail(f"batch {batch_id} is {status_}: there is nothing to continue")
            if not force and runner_alive(rec.header, int(time.time() * 1000)):
                fail(f"batch {batch_id} is RUNNING in {rec.header.get('runner')} (last progress "
                     f"{(time.time() * 1000 - int(rec.header.get('updated_ms') or 0)) / 1000:.0f}s ago): "
                     "stop it there first, or pass --force")
            _run(client, log, batch_id, per_second, answer_timeout, checkpoint_every, as_json)
        finally:
            log.close()


@app.command("stop")
def stop(batch_id: BatchId, bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False) -> None:
    """Stop a batch: its process sends nothing more after its next checkpoint (within a second).

    Commands already sent still take effect. A stopped batch cannot be continued; create a new
    one for the instances left (`kflow batch report ID --only pending` lists them).

    Example: kflow batch stop b-1a2b3c4d5e6f
    """
    from kflow.batch import BatchLog

    with _client(bootstrap, prefix, verbose) as client:
        log = BatchLog(client.config)
        try:
            rec = log.load(batch_id)
            if rec.header.get("status") in ("COMPLETED", "CANCELLED"):
                fail(f"batch {batch_id} is {rec.header.get('status')} already")
            log.request_cancel(batch_id, _who())
            if rec.header.get("status") != "RUNNING":  # nobody runs it: record the stop here
                rec.header["status"] = "CANCELLED"
                log.checkpoint(rec)
        finally:
            log.close()
    typer.echo(f"batch {batch_id}: stop requested")


def _register_migrate() -> None:
    """``kflow batch migrate`` is ``kflow migrate`` (what-if, then a batch of MigrateWorkflow)."""
    from kflow._cli.migrate import migrate

    app.command("migrate")(migrate)


_register_migrate()
