"""``kflow migrate``: move running instances to another version of their workflow, what-if first.

The plan is validated against the deployed definitions (one error listing every problem), the
instances ``--where`` selects are replayed against the target version and reported (compatible, or
the first divergence, and the waiting positions without a mapping), and then, unless ``--dry-run``,
a durable batch (:mod:`kflow.batch`) sends each one ``MigrateWorkflow``: the engine applies it at a
safe point, or rejects it with the reason and the instance keeps its version.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from kflow._cli.batch import AnswerTimeout, Api, AsJson, CheckpointEvery, MaxInstances, Rate, Reason, _run, _who
from kflow._cli.common import Bootstrap, Prefix, Verbose, dump_json, fail, setup_logging
from kflow.model.errors import KflowError

if TYPE_CHECKING:
    from kflow.batch.plan import Where
    from kflow.client import Client
    from kflow.engine.definitions import InMemoryDefinitions
    from kflow.engine.migration import WhatIf
    from kflow.model.messages import Event

__all__ = ["migrate", "what_if_reports"]

PlanFile = Annotated[Path, typer.Option("--plan", "-p", metavar="FILE", exists=True, dir_okay=False,
                                        help="Migration plan (YAML/JSON): id, workflow, from, to, step_map, vars, python.")]
MigrateWhere = Annotated[str, typer.Option(
    "--where", "-q", metavar="QUERY",
    help="Which instances: NAME=VALUE terms joined by AND, as for `kflow batch` (status, version, id_prefix, "
         "started_after, search.NAME ...). workflow= defaults to the plan's workflow.")]
CodeModules = Annotated[Optional[str], typer.Option(
    "--workflows", metavar="MODS", help="Comma-separated modules registering the code workflow's versions "
                                        "(@kflow.workflow): the what-if of a code workflow runs its new code.")]


def _definitions(client: Client, name: str) -> tuple[InMemoryDefinitions, dict[int, Any]]:
    """Every deployed version of ``name``, compiled: the table to replay on and version -> spec (None: code).

    A code workflow's versions are in the table when this process registered them (``--workflows``).
    """
    from kflow.engine import InMemoryDefinitions, compile_spec

    view = client.definitions_view(refresh=True)
    defs, versions = InMemoryDefinitions(), {}
    for v in view.versions(name):
        d = view.get(name, v)
        compiled = compile_spec(d.body) if d is not None and d.kind == "spec" else None
        versions[v] = compiled
        code = defs.registry.get(name, v) if compiled is None else None
        if compiled is not None:
            defs.add(compiled)
        elif code is not None:
            defs.add(code)
    return defs, versions


def _histories(client: Client, ids: list[str], timeout: float = 120.0) -> dict[str, list[Event]]:
    """The events of every instance in ``ids``, read in one pass over the events topic."""
    from kflow.readend import EndReader
    from kflow.schemas.codec import decode_event

    wanted = set(ids)
    found: dict[str, dict[int, Event]] = {iid: {} for iid in ids}
    topic = client.config.names.events
    with EndReader(client.config.consumer_conf(f"kflow-migrate-{uuid.uuid4().hex}"), timeout=10.0) as reader:
        for msg in reader.read(topic, timeout=timeout, what=f"reading {topic}"):
            key = msg.key()
            if key is None or msg.value() is None or key.decode() not in wanted:
                continue
            ev = decode_event(msg.value())
            found[ev.instance_id][ev.seq] = ev  # a seq seen again after an aborted transaction: the later one counts
    return {iid: [by_seq[s] for s in sorted(by_seq)] for iid, by_seq in found.items()}


def what_if_reports(client: Client, ids: list[str], defs: InMemoryDefinitions, to: int,
                    step_map: Optional[dict[str, str]] = None) -> list[WhatIf]:
    """Replay each instance's recorded history against version ``to`` (see :func:`kflow.engine.migration.what_if`)."""
    from kflow.engine.migration import what_if

    histories = _histories(client, ids)
    return [what_if(histories[iid], defs, to, step_map) for iid in ids]


def _line(r: WhatIf) -> str:
    text = f"{r.instance_id}: " + ("compatible" if r.divergence is None else f"diverges at {r.divergence.text()}")
    if r.unmapped:
        text += f"; positions without a mapping: {', '.join(r.unmapped)}"
    if r.problems:
        text += f"; {'; '.join(r.problems)}"
    if r.waiting_on:
        text += f"; moves once this ends: {'; '.join(r.waiting_on)}"
    return text


def print_reports(reports: list[WhatIf], as_json: bool, limit: int = 50) -> None:
    """Print the what-if reports (all as JSON lines, or up to ``limit`` as text) and a summary on stderr."""
    if as_json:
        for r in reports:
            typer.echo(dump_json(r.to_json()))
    else:
        for r in reports[:limit]:
            typer.echo(_line(r))
        if len(reports) > limit:
            typer.echo(f"... and {len(reports) - limit} more (--json lists every instance)")
    compatible = sum(1 for r in reports if r.compatible)
    movable = sum(1 for r in reports if not r.unmapped and not r.problems)
    typer.echo(f"what-if: {compatible} of {len(reports)} histories replay on the target unchanged; "
               f"{movable} have every position mapped", err=True)


def _select(client: Client, query: Where, api: Optional[str], max_instances: int) -> list[str]:
    from kflow.batch import select_from_api, select_from_state

    return select_from_api(api, query, max_instances) if api else select_from_state(client.config, query, max_instances)


def _scoped(where: str, workflow: str) -> Where:
    """The ``--where`` query, restricted to ``workflow`` (a query naming another workflow is an error)."""
    from kflow.batch import parse_where
    from kflow.batch.plan import WhereError

    query = parse_where(where)
    if query.workflow is not None and query.workflow != workflow:
        raise WhereError(f"--where names workflow '{query.workflow}', but the plan migrates '{workflow}'")
    return dataclasses.replace(query, workflow=workflow)


def migrate(
    plan_file: PlanFile,
    where: MigrateWhere,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only the what-if: validate the plan, replay each "
                                                            "selected history on the target and report; send nothing.")] = False,
    reason: Reason = "",
    rate: Rate = "50/s", max_instances: MaxInstances = 100_000, answer_timeout: AnswerTimeout = 30.0,
    checkpoint_every: CheckpointEvery = 100, api: Api = None, as_json: AsJson = False,
    workflows: CodeModules = None, bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False,
) -> None:
    """Move running instances to another version of their workflow with a migration plan.

    First the plan is checked against the deployed versions (every problem in one error: a range
    matching no version, a target not deployed, a step_map id unknown in either version). Then the
    what-if: each instance --where selects is replayed against the target version and reported as
    "compatible" or with its first divergence (event index, expected vs got), plus the waiting
    positions the step_map leaves without a place. With --dry-run that is all.

    Otherwise a batch sends each instance MigrateWorkflow (once, even if interrupted: continue it
    with `kflow batch continue ID`). The engine moves an instance only at a safe point (waiting on
    a signal, an update or a timer, or between steps). One with an activity or child in flight
    records the migration as pending (MigrationDeferred, reported as applied and deferred) and
    moves in the decision that records the result, before anything else runs; a position without
    a mapping or a failing variable transform, then or now, is rejected with the reason and the
    instance keeps running on its version. Each move is one WorkflowMigrated event (from, to, plan
    id).

    A code workflow (@kflow.workflow) moves to another registered version of its code whose replay
    of the instance's history issues exactly the recorded commands (changes guarded by
    ctx.patched()); otherwise the instance is rejected with the first divergence. Its plan has no
    step_map, vars or python; pass --workflows MODS so that the what-if can run the new code.

    A plan (YAML):

        id: order-v2
        workflow: order
        from: "^1"            # or 1.2.0, ~1.4, ">=1.2,<2", 1.x
        to: 2.0.0
        step_map: {approve: approval}      # old step id -> new; same ids map to themselves
        vars: {total: "prep.n * 10"}       # CEL over the variables before the move
        python: false         # true: also run the @kflow.migration function hosted by the engine

    Example: kflow migrate --plan order-v2.yaml --where "status=RUNNING" --dry-run
    """
    from kflow._migration import MigrationPlanError, check_plan, load_plan
    from kflow.batch import BatchLog, WhereError, new_batch, parse_rate

    setup_logging(verbose)
    try:
        plan = load_plan(plan_file)
        query = _scoped(where, plan.workflow)
        per_second = parse_rate(rate)
    except (MigrationPlanError, WhereError) as e:
        fail(str(e))
    if workflows:
        from kflow.authoring import code_definitions

        code_definitions(workflows)
    from kflow.client import Client

    with Client(bootstrap, topic_prefix=prefix) as client:
        defs, versions = _definitions(client, plan.workflow)
        try:
            check_plan(plan, versions)
        except MigrationPlanError as e:
            fail(str(e))
        try:
            ids = _select(client, query, api, max_instances)
        except (KflowError, WhereError) as e:
            fail(str(e))
        if not ids:
            fail(f"no instance matches {query.text()!r}: nothing to migrate")
        if versions.get(plan.to_version, "spec") is None and defs.get(plan.workflow, plan.to_version) is None:
            where_code = f"the module that registers {plan.workflow}@{plan.to}"
            if dry_run:
                fail(f"the what-if of code workflow {plan.workflow}@{plan.to} runs its code: pass --workflows "
                     f"MODS ({where_code})")
            typer.echo(f"no what-if: {plan.workflow}@{plan.to} is a code workflow not registered here (--workflows "
                       "MODS); the engine replays each instance on it before it moves it", err=True)
        else:
            print_reports(what_if_reports(client, ids, defs, plan.to_version, plan.step_map), as_json)
        if dry_run:
            typer.echo(f"dry run: {len(ids)} instance(s) would be sent MigrateWorkflow (nothing was sent)", err=True)
            return
        log = BatchLog(client.config)
        try:
            rec = new_batch(log, "migrate", query, ids,
                            {"plan": plan.model_dump(by_alias=True), "reason": reason}, per_second, _who())
            typer.echo(f"batch {rec.id}: migrate of {len(ids)} instance(s) to {plan.workflow}@{plan.to} at "
                       f"{per_second:g}/s; if it is interrupted, `kflow batch continue {rec.id}` carries on", err=True)
            _run(client, log, rec.id, None, answer_timeout, checkpoint_every, as_json)
        finally:
            log.close()


def replay_definition(definition: Path, where: str, as_json: bool, api: Optional[str], max_instances: int,
                      bootstrap: Optional[str], prefix: Optional[str]) -> None:
    """``kflow replay --definition FILE --where QUERY``: the what-if of a new spec version, nothing deployed."""
    from kflow.batch import WhereError
    from kflow.client import load_spec
    from kflow.engine import compile_spec
    from kflow.model.errors import DefinitionError

    try:
        target = compile_spec(load_spec(definition))
        query = _scoped(where, target.name)
    except (DefinitionError, WhereError) as e:
        fail(str(e))
    from kflow.client import Client

    with Client(bootstrap, topic_prefix=prefix) as client:
        defs, _ = _definitions(client, target.name)
        known = defs.get(target.name, target.version)
        if known is not None and known.fingerprint != target.fingerprint:
            fail(f"{definition} is {target.name}@{target.version}, which is deployed with other content: bump its version")
        if known is None:
            defs.add(target)
        reports = _replay_selected(client, query, api, max_instances, defs, target.version)
    _print_verdicts(reports, as_json)


def _replay_selected(client: Any, query: Any, api: Optional[str], max_instances: int, defs: Any,
                     version: int) -> list[WhatIf]:
    """The what-if of every instance ``query`` selects against ``version`` (none selected: one error)."""
    from kflow.batch import WhereError

    try:
        ids = _select(client, query, api, max_instances)
    except (KflowError, WhereError) as e:
        fail(str(e))
    if not ids:
        fail(f"no instance matches {query.text()!r}: nothing to replay")
    return what_if_reports(client, ids, defs, version)


def _print_verdicts(reports: list[WhatIf], as_json: bool) -> None:
    """Print the reports; exit 1 when any history diverges."""
    print_reports(reports, as_json)
    if any(not r.compatible for r in reports):
        raise typer.Exit(1)


def replay_code(workflows: str, target: str, where: str, as_json: bool, api: Optional[str], max_instances: int,
                bootstrap: Optional[str], prefix: Optional[str]) -> None:
    """``kflow replay --workflows MODS --workflow NAME@VERSION --where QUERY``: the what-if of code.

    Each selected instance's history is replayed on the registered code of ``NAME@VERSION`` (the
    replay a migration makes), reported as compatible or with the first command it does not
    reproduce; nothing is sent.
    """
    from kflow.authoring import code_definitions, default_registry
    from kflow.batch import WhereError

    code_definitions(workflows)
    name, _, text = target.partition("@")
    known = default_registry.versions(name)
    try:
        from kflow.engine.migration import resolve_version

        version = resolve_version(name, text or None, known)
        query = _scoped(where, name)
    except (KflowError, WhereError) as e:
        fail(str(e))
    from kflow.client import Client

    with Client(bootstrap, topic_prefix=prefix) as client:
        defs, _ = _definitions(client, name)
        code = default_registry.get(name, version)
        assert code is not None  # resolved among the registered versions
        defs.add(code)
        reports = _replay_selected(client, query, api, max_instances, defs, version)
    _print_verdicts(reports, as_json)
