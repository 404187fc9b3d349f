"""The read-side commands: ``visibility`` (projection + API + console), ``list``, ``history`` and
``watch``, and the step tree ``status`` prints.

``list``, ``history``, ``status`` and ``watch`` ask the visibility API when ``KFLOW_API`` (or
``--api``) names one, and otherwise read Kafka directly: the compacted ``state`` topic for
instances, ``definitions`` for a graph; an instance's status comes from the engine that owns it
and its history from its events partition, starting where that history starts (``--scan`` reads
both topics from the beginning instead, without an engine).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import httpx
import typer

from kflow._cli.common import Bootstrap, Prefix, Verbose, dump_json, fail, setup_logging

__all__ = ["fetch_status", "history", "list_instances", "render_step_tree", "visibility", "watch"]

Api = Annotated[Optional[str], typer.Option("--api", metavar="URL", envvar="KFLOW_API",
                                            help="Visibility API to ask instead of reading Kafka (KFLOW_API).")]
_STYLE = {"running": "bold blue", "done": "green", "failed": "bold red", "pending": "dim"}
_MARK = {"running": "▶", "done": "✔", "failed": "✖", "pending": "·"}
_STATUS_STYLE = {"RUNNING": "blue", "COMPLETED": "green", "FAILED": "red", "TERMINATED": "red",
                 "CANCELLED": "yellow", "CANCELLING": "yellow", "COMPENSATING": "yellow", "BLOCKED": "blue",
                 "SUSPENDED": "magenta", "INCIDENT": "bold red", "QUEUED": "cyan"}
_TIMEOUT = 10.0
T = TypeVar("T")


# --------------------------------------------------------------------------- the API side


def _api_get(api: str, path: str, **params: Any) -> Any:
    """GET ``path`` on the API; an error answer exits with its message."""
    try:
        res = httpx.get(api.rstrip("/") + path, params={k: v for k, v in params.items() if v is not None},
                        timeout=_TIMEOUT)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the visibility API at {api}: {exc}")
    if res.status_code >= 400:
        try:
            message = res.json().get("error", res.text)
        except ValueError:
            message = res.text
        fail(f"{message} ({res.status_code} from {api})")
    return res.json()


# --------------------------------------------------------------------------- the Kafka side


def _config(bootstrap: Optional[str], prefix: Optional[str]) -> Any:
    from kflow.config import KafkaConfig

    overrides: dict[str, Any] = {}
    if bootstrap:
        overrides["bootstrap"] = bootstrap
    if prefix is not None:
        overrides["topic_prefix"] = prefix
    return KafkaConfig(**overrides)


def _read_topic(config: Any, topic: str, partitions: Optional[list[int]] = None) -> list[Any]:
    """Every record of ``topic`` (or of some partitions) up to the high watermarks, in order per partition.

    A read that takes longer than a minute raises :class:`~kflow.model.errors.BrokerUnavailable`.
    """
    from kflow.readend import EndReader

    with EndReader(config.consumer_conf(f"kflow-cli-{uuid.uuid4().hex}"), timeout=_TIMEOUT) as reader:
        available = reader.partitions(topic)
        if not available:
            fail(f"topic '{topic}' is not available on {config.bootstrap}")
        return list(reader.read(topic, available if partitions is None else partitions, timeout=60))


def _latest_states(config: Any) -> dict[str, dict[str, Any]]:
    from kflow.schemas.codec import decode_state

    states: dict[str, dict[str, Any]] = {}
    for msg in _read_topic(config, config.names.state):
        if msg.key() is None:
            continue
        if msg.value() is None:
            states.pop(msg.key().decode(), None)
            continue
        st = decode_state(msg.value())
        states[st["instance_id"]] = st
    return states


def _definition_body(config: Any, name: str, version: int) -> Optional[dict[str, Any]]:
    from kflow.schemas.codec import decode_definition

    body = None
    key = f"{name}@{version}".encode()
    for msg in _read_topic(config, config.names.definitions):
        if msg.key() == key and msg.value() is not None:
            d = decode_definition(msg.value())
            body = d.body if d.kind == "spec" else None
    return body


# --------------------------------------------------------------------------- status: the step tree


StatusView = tuple[Optional[dict[str, Any]], dict[str, str], Optional[dict[str, Any]]]


Scan = Annotated[bool, typer.Option("--scan", help="Read the topics from the beginning instead of asking the "
                                                   "engine (works without a running engine; slow on big topics).")]


def fetch_status(id: str, bootstrap: Optional[str], prefix: Optional[str], api: Optional[str] = None,
                 scan: bool = False, timeout: float = _TIMEOUT) -> StatusView:
    """The state record of ``id``, its step states and its spec definition body (None for code workflows).

    Asks the API when ``api`` (or ``KFLOW_API``) is set; otherwise the engine that owns ``id``
    (within ``timeout`` seconds), or with ``scan`` the state and events topics from the beginning.
    """
    api = api or os.environ.get("KFLOW_API") or None
    if api:
        try:
            res = httpx.get(f"{api.rstrip('/')}/api/instances/{id}", timeout=_TIMEOUT)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the visibility API at {api}: {exc}")
        if res.status_code == 404:
            return None, {}, None
        if res.status_code >= 400:
            fail(f"{res.json().get('error', res.text)} ({res.status_code} from {api})")
        inst = res.json()
        state = {k: inst.get(k) for k in ("instance_id", "workflow", "version", "status", "seq", "started_ms",
                                          "updated_ms", "closed_ms", "result", "error_type", "error_message")}
        state["internal"] = inst.get("state") or {}
        body = None
        if inst.get("graph") is not None:
            body = _api_get(api, f"/api/definitions/{inst['workflow']}/{inst['version']}")["body"]
        return state, inst.get("steps") or {}, body
    from kflow.client import Client
    from kflow.visibility.graph import history_steps, resolve_steps, step_index, succeed_steps, track_steps

    with Client(bootstrap, topic_prefix=prefix) as client:
        state = _ask_engine(lambda: client.status(id, timeout=timeout, scan=scan), timeout)
        if state is None:
            return None, {}, None
        body = _definition_body(client.config, state["workflow"], state["version"])
        if body is None:
            return state, {}, None
        # the latest state record alone shows only where threads wait now: nothing once the instance
        # closed, and never the steps that ran inside one decision; the history shows them all
        events = _ask_engine(lambda: client.history(id, timeout=timeout, scan=scan), timeout)
    steps = history_steps(body, events)
    if steps is None:
        tracked = track_steps({}, state["status"], state.get("internal") or {})
        steps = resolve_steps(tracked, step_index(body), state["status"], succeed_steps(body))
    return state, steps, body


def _ask_engine(read: Callable[[], T], timeout: float) -> T:
    """``read()``, turning "no engine answered" into an error that names the way out."""
    try:
        return read()
    except TimeoutError:
        fail(f"no engine answered within {timeout:g}s: is an engine running on these topics? "
             "(--scan reads the topics without one)")


def render_step_tree(body: dict[str, Any], steps: dict[str, str]) -> Any:
    """A rich Tree of a spec's steps, each marked pending, running, done or failed."""
    from rich.text import Text
    from rich.tree import Tree

    root = Tree(Text(f"{body.get('name')}@{body.get('version', 1)}", style="bold"))

    def add(parent: Any, step_list: list[dict[str, Any]]) -> None:
        for s in step_list:
            sid = str(s.get("id"))
            st = steps.get(sid, "pending")
            kind = next((k for k in ("task", "choice", "parallel", "foreach", "wait", "sleep", "child", "set",
                                     "succeed", "fail") if k in s), "?")
            detail = (s.get("task") or (s.get("wait") or {}).get("signal")
                      or (s.get("child") or {}).get("workflow") or "")
            label = Text(f"{_MARK[st]} {sid}", style=_STYLE[st])
            label.append(f"  {kind}{' ' + str(detail) if detail else ''}", style="dim")
            label.append(f"  {st}", style=_STYLE[st])
            node = parent.add(label)
            for i, branch in enumerate(s.get("parallel") or []):
                add(node.add(Text(f"branch {i}", style="dim")), branch.get("steps") or [])
            if s.get("steps"):
                add(node, s["steps"])

    add(root, list(body.get("steps") or []))
    return root


# --------------------------------------------------------------------------- commands


def visibility(
    port: Annotated[Optional[int], typer.Option("--port", "-p", min=0, max=65535, envvar="KFLOW_VISIBILITY_PORT",
                                                help="Port of the API and console (default 8088).")] = None,
    host: Annotated[Optional[str], typer.Option("--host", envvar="KFLOW_VISIBILITY_HOST",
                                                help="Address to listen on (default 127.0.0.1).")] = None,
    url: Annotated[Optional[str], typer.Option("--url", metavar="URL", envvar="KFLOW_VISIBILITY_URL",
                                               help="Store URL (default: SQLite in the state directory).")] = None,
    state_dir: Annotated[Optional[str], typer.Option("--state-dir", metavar="DIR", envvar="KFLOW_STATE_DIR",
                                                     help="Directory of the default SQLite store.")] = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Run the read side: the projection, the HTTP API and the web console, until SIGINT or SIGTERM.

    Folds the state, events and definitions topics into the visibility store (SQLite by default,
    PostgreSQL with --url postgresql://...) and serves the console at /, the API at /api and its
    OpenAPI documentation at /docs, plus /metrics, /healthz and /readyz.

    Example: kflow visibility --port 8088 --url postgresql://kflow@db/kflow
    """
    setup_logging(verbose)
    from kflow._cli.processes import run_until_signalled
    from kflow.config import VisibilityConfig, load_config
    from kflow.visibility.server import VisibilityServer

    overrides: dict[str, Any] = {"visibility_port": port, "visibility_host": host, "visibility_url": url,
                                 "state_dir": state_dir, "bootstrap": bootstrap, "topic_prefix": prefix}
    config = load_config(VisibilityConfig, **{k: v for k, v in overrides.items() if v is not None})
    server = VisibilityServer(config)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    typer.echo(f"kflow console: {server.url}/ (API docs at {server.url}/docs; store {server.store!r})", err=True)
    run_until_signalled(server.run, "visibility")


def list_instances(
    status: Annotated[Optional[str], typer.Option("--status", "-s", help="Comma-separated statuses.")] = None,
    workflow: Annotated[Optional[str], typer.Option("--workflow", "-w", help="Workflow name.")] = None,
    search: Annotated[Optional[list[str]], typer.Option("--search", metavar="NAME:VALUE",
                                                        help="Search attribute filter (repeatable).")] = None,
    where: Annotated[Optional[str], typer.Option(
        "--where", metavar="QUERY",
        help="A query as kflow batch takes it: NAME=VALUE terms joined by AND (status, workflow, version, tenant, "
             "started_after/before, closed_after/before, id_prefix, search.NAME); ANDed with the other filters.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="Most rows shown.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    api: Api = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """List workflow instances, newest first, with filters.

    Asks the visibility API when KFLOW_API is set (fast, indexed); otherwise reads the whole
    state topic from Kafka and filters locally. --where selects exactly what a batch operation
    with the same query would act on.

    Example: kflow list --status RUNNING --workflow order --search customer:acme
    Example: kflow list --where "status=RUNNING AND workflow=order AND started_after=2026-12-01"
    """
    setup_logging(verbose)
    from kflow.batch.plan import WhereError, parse_where

    try:
        query = parse_where(where) if where else None
    except WhereError as exc:
        fail(f"--where: {exc}")
    pairs = []
    for item in search or []:
        name, sep, value = item.partition(":")
        if not sep or not name:
            fail(f"--search takes name:value, but got {item!r}")
        pairs.append((name, value))
    statuses = {s.strip().upper() for s in status.split(",")} if status else set()
    if api:
        params: dict[str, Any] = query.api_params() if query is not None else {}
        for name, given in (("status", status), ("workflow", workflow)):
            if given and name in params and params[name] != given:
                fail(f"--{name} {given!r} contradicts --where's {name}={params[name]!r}: give it once")
            if given:
                params[name] = given
        params["search"] = [*params.get("search", []), *(f"{n}:{v}" for n, v in pairs)] or None
        rows = _api_get(api, "/api/instances", limit=limit, **params)["items"]
    else:
        from kflow.engine.search import search_text

        rows = []
        for st in _latest_states(_config(bootstrap, prefix)).values():
            search_attrs = st.get("search_attributes") or {}
            if statuses and st["status"] not in statuses or workflow and st["workflow"] != workflow:
                continue
            if query is not None and not query.matches(st):
                continue
            if any(n not in search_attrs or search_text(search_attrs[n]) != v for n, v in pairs):
                continue
            rows.append({k: st.get(k) for k in ("instance_id", "workflow", "version", "status", "started_ms",
                                                "closed_ms")} | {"search": search_attrs})
        rows.sort(key=lambda r: (r["started_ms"], r["instance_id"]), reverse=True)
        rows = rows[:limit]
    if as_json:
        for r in rows:
            typer.echo(dump_json(r))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("instance", "workflow", "status", "started", "closed", "search")
    for r in rows:
        table.add_row(r["instance_id"], f"{r['workflow']}@{r['version']}",
                      f"[{_STATUS_STYLE.get(r['status'], '')}]{r['status']}[/]", _when(r["started_ms"]),
                      _when(r.get("closed_ms")), " ".join(f"{k}={v}" for k, v in (r.get("search") or {}).items()))
    Console(soft_wrap=False).print(table)


def history(
    id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON event per line.")] = False,
    scan: Scan = False,
    api: Api = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Print the history (events) of a workflow instance, oldest first.

    Asks the visibility API when KFLOW_API is set. Otherwise asks the engine that owns the
    instance where its history starts on the events topic and reads from there to its last
    event; --scan reads the instance's events partition from the beginning (no engine needed).

    Example: kflow history order-42 --json | jq .type
    """
    setup_logging(verbose)
    events: list[dict[str, Any]] = []
    if api:
        after = 0
        while True:
            page = _api_get(api, f"/api/instances/{id}/history", after_seq=after, limit=1000)
            events.extend(page["items"])
            if page["next_after_seq"] is None:
                break
            after = page["next_after_seq"]
    else:
        from kflow.client import Client

        with Client(config=_config(bootstrap, prefix)) as client:
            found = _ask_engine(lambda: client.history(id, scan=scan), _TIMEOUT)
        events = [{"instance_id": ev.instance_id, "seq": ev.seq, "type": ev.type, "ts": ev.ts, "data": ev.data}
                  for ev in found]
    if not events:
        fail(f"no history for workflow instance '{id}'")
    for ev in events:
        if as_json:
            typer.echo(dump_json(ev))
        else:
            typer.echo(f"{ev['seq']:>5}  {_when(ev['ts'])}  {ev['type']:<20} {dump_json(ev['data'])}")


def watch(
    workflow: Annotated[Optional[str], typer.Option("--workflow", "-w", help="Only this workflow.")] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")] = 1.0,
    count: Annotated[int, typer.Option("--count", min=0, help="Stop after this many refreshes (0: until Ctrl-C).")] = 0,
    api: Api = None,
    bootstrap: Bootstrap = None,
    prefix: Prefix = None,
    verbose: Verbose = False,
) -> None:
    """Show live counts of instances per status until Ctrl-C.

    Polls the visibility API when KFLOW_API is set; otherwise re-reads the state topic.

    Example: KFLOW_API=http://127.0.0.1:8088 kflow watch --workflow order
    """
    setup_logging(verbose)
    from rich.live import Live
    from rich.table import Table

    def counts() -> dict[str, int]:
        if api:
            return dict(_api_get(api, "/api/instances/counts", workflow=workflow)["counts"])
        out: dict[str, int] = {}
        for st in _latest_states(_config(bootstrap, prefix)).values():
            if not workflow or st["workflow"] == workflow:
                out[st["status"]] = out.get(st["status"], 0) + 1
        return out

    def table(c: dict[str, int]) -> Table:
        t = Table("status", "instances", title=f"kflow instances{' of ' + workflow if workflow else ''}")
        for s, n in c.items():
            if n:
                t.add_row(f"[{_STATUS_STYLE.get(s, '')}]{s}[/]", str(n))
        t.add_row("[bold]total[/]", str(sum(c.values())))
        return t

    shown = 0
    try:
        with Live(table(counts()), auto_refresh=False) as live:
            shown = 1
            while count == 0 or shown < count:
                time.sleep(interval)
                live.update(table(counts()), refresh=True)
                shown += 1
    except KeyboardInterrupt:
        pass


def _when(ms: Optional[int]) -> str:
    import datetime as dt

    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
