"""The client commands: ``deploy``, ``start``, ``signal``, ``cancel``, ``status`` and ``result``.

Each opens a :class:`~kflow.client.Client` on ``--bootstrap``/``--prefix`` (or ``KFLOW_*``), does
one thing, and prints machine-friendly output on stdout (ids, JSON); logs go to stderr.
"""

from __future__ import annotations

import datetime as dt
import getpass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, dump_json, fail, parse_json, setup_logging
from kflow.client import ID_REUSE_POLICIES, Client, WorkflowHandle
from kflow.model.errors import KflowError, UpdateFailedError, UpdateRejectedError, WorkflowFailedError
from kflow.model.messages import PRIORITIES, Status, priority_level

__all__ = ["cancel", "deploy", "result", "signal", "start", "status", "update"]

EXIT_FAILED = 1
EXIT_TIMEOUT = 2

Timeout = Annotated[float, typer.Option("--timeout", "-t", min=0, metavar="SECONDS", help="How long to wait.")]


def _client(bootstrap: str | None, prefix: str | None, verbose: bool) -> Client:
    setup_logging(verbose)
    return Client(bootstrap, topic_prefix=prefix)


def _print_result(handle: WorkflowHandle, timeout: float) -> None:
    """Print the result of ``handle``; a failure, or a start the engine rejected, exits 1."""
    try:
        value = handle.result(timeout)
    except WorkflowFailedError as exc:
        fail(str(exc), EXIT_FAILED)
    except TimeoutError:
        fail(f"workflow {handle.id} did not finish within {timeout:g}s", EXIT_TIMEOUT)
    typer.echo(dump_json(value))


def deploy(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Spec workflow definition (YAML or JSON).")],
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Validate a spec workflow definition and publish it to the definitions topic.

    The definition is checked locally first (every invalid step is named) and then produced to
    the compacted definitions topic under the key name@version, where every engine picks it up.
    A deployed version never changes: the same content again is a no-op, and other content under
    a deployed name@version is refused (bump 'version' to deploy a change). Running instances
    stay on the version, and the content, they started with.

    Example: kflow deploy order.yaml --bootstrap localhost:9092
    """
    with _client(bootstrap, prefix, verbose) as client:
        definition = client.deploy(file)
    if definition.unchanged:
        typer.echo(f"{definition.key} already deployed, unchanged")
    else:
        typer.echo(f"deployed {definition.key}")


def start(
    name: Annotated[str, typer.Argument(help="Name of the deployed workflow.")],
    input: Annotated[Optional[str], typer.Option(
        "--input", "-i", metavar="JSON", help="Workflow input as JSON, or @FILE to read it from a file.")] = None,
    id: Annotated[Optional[str], typer.Option("--id", help="Instance id (default: a random one).")] = None,
    version: Annotated[Optional[int], typer.Option(
        "--version", min=1, help="Definition version (default: latest).")] = None,
    id_reuse: Annotated[Optional[str], typer.Option(
        "--id-reuse", metavar="POLICY",
        help=f"What to do if the id exists: {', '.join(sorted(ID_REUSE_POLICIES))}.")] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait for the result and print it as JSON.")] = False,
    timeout: Timeout = 30.0,
    priority: Annotated[Optional[str], typer.Option(
        "--priority", metavar="LEVEL",
        help=f"Priority of the instance's tasks: {', '.join(PRIORITIES)} (default: the definition's, "
             "else normal).")] = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Start a workflow instance and print its id (or, with --wait, its result).

    Checks that the workflow (and --version) is deployed, then produces a StartWorkflow command
    keyed by the instance id to the commands topic; a workflow that is not deployed is an error
    (exit 1) and nothing is sent. With --wait the command waits for the instance to finish and
    prints the result as JSON; it exits with 1 if the workflow failed or was cancelled, or if
    the engine rejected the start (its reason is printed), and 2 if it did not finish within
    --timeout.

    Example: kflow start order --input '{"sku": "A1", "qty": 2}' --wait --timeout 60
    """
    payload = parse_json(input, "--input")
    priority_level(priority)  # an unknown level is an error before anything connects
    with _client(bootstrap, prefix, verbose) as client:
        handle = client.start(name, payload, id=id, version=version, id_reuse=id_reuse, priority=priority)
        if not wait:
            typer.echo(handle.id)
            return
        typer.echo(f"started {handle.id}", err=True)
        _print_result(handle, timeout)


def signal(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="Signal name.")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", metavar="JSON",
                                                help="Signal data as JSON, or @FILE.")] = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Send a signal with optional JSON data to a running workflow instance.

    A workflow waiting for the signal (a spec 'wait' step, or wait_signal in code) resumes with
    the data as the step's output; signals that arrive early are kept until they are awaited.

    Example: kflow signal order-42 approval --data '{"by": "alice"}'
    """
    payload = parse_json(data, "--data")
    with _client(bootstrap, prefix, verbose) as client:
        client.signal(id, name, payload)
    typer.echo(f"signalled {id}: {name}")


EXIT_REJECTED = 3


def update(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="Update name.")],
    data: Annotated[Optional[str], typer.Argument(metavar="[DATA_JSON]",
                                                  help="Update data as JSON, or @FILE (default: null).")] = None,
    update_id: Annotated[Optional[str], typer.Option("--update-id", "-u", metavar="ID",
                                                     help="Idempotency key: sending the same id again returns the "
                                                          "first answer and runs nothing twice (default: a fresh id).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", "-t", min=0, metavar="SECONDS",
                                           help="How long to wait for the answer.")] = 30.0,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Send a running workflow an update (a signal that returns a result) and print the answer.

    The engine that owns the instance validates the update first: a rejected one writes no
    history. Code workflows handle it with a @kflow.workflow.update method (a validator marked with
    @METHOD.validator may reject it); spec workflows with a 'wait' step that has 'update: NAME' (and optionally
    'validate:' and 'reply:' CEL). The answer is printed as JSON on stdout once the handler
    returns. Exit codes: 1 the handler failed, 2 no answer within --timeout (send the same
    --update-id again to keep waiting), 3 the update was rejected.

    Example: add an item to a running cart, then retry safely with the same id:

        $ kflow update cart-7 add '{"sku": "A1", "qty": 2}' --update-id add-A1
        3
        $ kflow update cart-7 add '{"sku": "A1", "qty": 2}' --update-id add-A1
        3
        $ kflow update order-42 approve '{"amount": 500}'
        error: update 'approve' on order-42 rejected: UpdateRejected: step 'approve': validate ...
    """
    payload = parse_json(data, "DATA_JSON")
    with _client(bootstrap, prefix, verbose) as client:
        try:
            answer = client.update(id, name, payload, update_id=update_id, timeout=timeout)
        except UpdateRejectedError as exc:
            fail(str(exc), EXIT_REJECTED)
        except UpdateFailedError as exc:
            fail(str(exc), EXIT_FAILED)
        except TimeoutError as exc:
            fail(str(exc), EXIT_TIMEOUT)
    typer.echo(dump_json(answer))


def cancel(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    reason: Annotated[str, typer.Option("--reason", "-r", metavar="TEXT", help="Why (recorded in the event).")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Ask the engine to cancel a running workflow instance.

    The instance ends CANCELLED with the reason recorded; a result waiter sees it as a failure.

    Example: kflow cancel order-42 --reason "customer withdrew"
    """
    _stop(id, reason, "cancel", bootstrap, prefix, verbose)


def terminate(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    reason: Annotated[str, typer.Option("--reason", "-r", metavar="TEXT", help="Why (recorded in the event).")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Stop a workflow instance immediately, with no cleanup (no compensations, no finally).

    The instance ends TERMINATED; its children are terminated too. Use `kflow cancel` to let the
    workflow clean up instead.

    Example: kflow terminate order-42 --reason "runaway loop"
    """
    _stop(id, reason, "terminate", bootstrap, prefix, verbose)


def suspend(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    reason: Annotated[str, typer.Option("--reason", "-r", metavar="TEXT", help="Why (recorded in the event).")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Pause a workflow instance: it dispatches no new tasks and fires no timers until resumed.

    Activities already running finish and their results are recorded; those results, timers that
    come due and signals that arrive are applied, in order, by `kflow resume`. The instance shows
    SUSPENDED. A closed instance cannot be suspended (the command is rejected).

    Example: kflow suspend order-42 --reason "supplier outage"
    """
    _stop(id, reason, "suspend", bootstrap, prefix, verbose)


def resume(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    reason: Annotated[str, typer.Option("--reason", "-r", metavar="TEXT", help="Why (recorded in the event).")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Resume a suspended workflow instance: what it held is applied in arrival order, then it runs on.

    Example: kflow resume order-42
    """
    _stop(id, reason, "resume", bootstrap, prefix, verbose)


def retry(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    from_step: Annotated[Optional[str], typer.Option("--from", metavar="STEP",
                                                     help="Top-level step to re-open at (default: where it failed).")] = None,
    input_patch: Annotated[Optional[str], typer.Option("--input-patch", metavar="JSON",
                                                       help="JSON object merged into the variables, or @FILE.")] = None,
    to_event: Annotated[Optional[int], typer.Option(
        "--to-event", metavar="N", min=0,
        help="Code workflows: reset to event N of its history (kflow history ID shows the numbers; "
             "default: the last event before the one that ended it).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Also re-open a CANCELLED or TERMINATED instance.")] = False,
    reason: Annotated[str, typer.Option("--reason", "-r", metavar="TEXT", help="Why (recorded in the event).")] = "",
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Re-open a FAILED workflow instance where it failed, or earlier.

    A spec workflow re-opens at the step it failed at (or --from STEP), its variables as they
    were, updated with --input-patch (a key "input" replaces the workflow input); the steps before
    it do not run again.

    A code workflow is reset to the last event before the one that ended it (or --to-event N) and
    replays from there: activities it had completed are not run again, the ones pending at that
    point are dispatched again under a new attempt. --from and --input-patch are for spec
    workflows only.

    The history keeps everything: a WorkflowRetried event records where, who and why; a retry
    that does not fit is recorded as CommandRejected with the reason (kflow history ID).

    Example: kflow retry order-42 --from charge --input-patch '{"card": "tok_2"}' --reason "new card"

    Example: kflow retry payment-7 --to-event 12 --reason "re-run the charge"
    """
    if from_step is not None and to_event is not None:
        fail("--from names a spec workflow's step and --to-event a code workflow's event: give one of them")
    patch = parse_json(input_patch, "--input-patch")
    if patch is not None and not isinstance(patch, dict):
        fail(f"--input-patch must be a JSON object, but got {type(patch).__name__}")
    with _client(bootstrap, prefix, verbose) as client:
        if from_step is not None or patch is not None:
            st = client.status(id)  # spec-only options: say so here rather than only in the history
            if st is not None and st.get("kind") == "code":
                fail(f"{id} is a code workflow instance: --from and --input-patch are for spec workflows; "
                     "reset it with --to-event N (kflow history ID shows the event numbers)")
        client.retry(id, from_step, patch, force=force, reason=reason, by=_operator(), to_event=to_event)
    typer.echo(f"retry requested for {id}")


def _operator() -> str:
    """The login name of who runs the command, for the history ("" where the system has none)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return ""


def _stop(id: str, reason: str, how: str, bootstrap: str | None, prefix: str | None, verbose: bool) -> None:
    with _client(bootstrap, prefix, verbose) as client:
        getattr(client, how)(id, reason)
    typer.echo(f"{how} requested for {id}")


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).astimezone().isoformat(timespec="milliseconds")


_STYLE = {Status.RUNNING: "cyan", Status.COMPLETED: "green", Status.FAILED: "red",
          Status.CANCELLED: "yellow", Status.BLOCKED: "magenta", Status.SUSPENDED: "blue",
          Status.INCIDENT: "bold yellow"}


def _render(state: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    status_ = state["status"]
    table.add_row("instance", Text(state["instance_id"]))
    table.add_row("status", Text(status_, style=_STYLE.get(status_, "")))
    table.add_row("workflow", Text(f"{state['workflow']}@{state['version']}"))
    table.add_row("seq", str(state["seq"]))
    table.add_row("started", _when(state["started_ms"]))
    table.add_row("updated", _when(state["updated_ms"]))
    if state.get("closed_ms") is not None:
        took = (state["closed_ms"] - state["started_ms"]) / 1000
        table.add_row("closed", f"{_when(state['closed_ms'])}  ({took:.3f}s)")
    if status_ == Status.COMPLETED:
        table.add_row("result", Text(dump_json(state.get("result"))))
    if state.get("error_type") or state.get("error_message"):
        table.add_row("error", Text(f"{state.get('error_type')}: {state.get('error_message')}", style="red"))
    pending = (state.get("internal") or {}).get("pending_migration")
    if pending:
        from kflow.model.versions import format_version

        table.add_row("migration", Text(f"pending: plan '{pending.get('plan_id')}' to "
                                        f"{format_version(pending['to_version'])}, once this ends: "
                                        f"{pending.get('waiting_on', '')}"))
    Console(soft_wrap=False).print(table)


def _start_rejection(id: str, bootstrap: str | None, prefix: str | None, verbose: bool,
                     scan: bool = False) -> str | None:
    """The engine's reason for dead-lettering the start of ``id``, or None (also when it cannot be read)."""
    try:
        with _client(bootstrap, prefix, verbose) as client:
            return client.start_rejection(id, scan=scan)
    except (KflowError, TimeoutError):
        return None


def status(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw state record as JSON.")] = False,
    scan: Annotated[bool, typer.Option("--scan", help="Read the state and events topics from the beginning "
                                                      "instead of asking the engine (no engine needed).")] = False,
    timeout: Annotated[float, typer.Option("--timeout", "-t", min=0.1, metavar="SECONDS",
                                           help="How long to wait for the engine's answer.")] = 10.0,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Show the current state of a workflow instance.

    Asks the engine that owns the instance (it answers from its state, writing no history) and
    shows its status, workflow@version, event sequence number, times, and its result or error.
    With no engine running this fails after --timeout; --scan reads the instance's partition of
    the state topic from the beginning instead.

    With KFLOW_API set, asks the visibility API instead. A spec workflow's steps are drawn as a
    tree marked pending, running, done or failed, worked out from the instance's history (read
    from where it starts on the events topic): a step whose error a catch route took is failed,
    the handler's steps done.

    Example: kflow status order-42 --json
    """
    from kflow._cli.visibility import fetch_status, render_step_tree

    setup_logging(verbose)
    state, steps, body = fetch_status(id, bootstrap, prefix, scan=scan, timeout=timeout)
    if state is None:
        reason = _start_rejection(id, bootstrap, prefix, verbose, scan)
        if reason is not None:
            fail(f"workflow instance '{id}' was not started: the engine rejected its start: {reason} "
                 "(see 'kflow dlq list')")
        fail(f"no state for workflow instance '{id}' (never started, or not processed yet)")
    if as_json:
        typer.echo(dump_json(state))
    else:
        _render(state)
        if body is not None:
            from rich.console import Console

            Console(soft_wrap=False).print(render_step_tree(body, steps))


def result(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    timeout: Timeout = 30.0,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Wait for a workflow instance to finish and print its result as JSON on stdout.

    Exit codes: 0 completed (result on stdout), 1 failed or cancelled (the error on stderr),
    2 not finished within --timeout.

    Example: kflow result order-42 --timeout 120 | jq .tracking
    """
    with _client(bootstrap, prefix, verbose) as client:
        _print_result(client.handle(id), timeout)
