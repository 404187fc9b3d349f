"""``kflow dlq list`` and ``kflow dlq replay``: inspect and re-send dead-lettered messages."""

from __future__ import annotations

import datetime as dt
import socket
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from kflow._cli.common import Bootstrap, Prefix, Verbose, describe, dump_json, fail, setup_logging
from kflow.config import KafkaConfig
from kflow.dlq import DlqRecord, read_dlq, replay
from kflow.model.errors import KflowError
from kflow.streams.policies import read_policy

app = typer.Typer(help="Inspect and replay the dead-letter topic.", no_args_is_help=True)


def _config(bootstrap: Optional[str], prefix: Optional[str]) -> KafkaConfig:
    kw = {}
    if bootstrap:
        kw["bootstrap"] = bootstrap
    if prefix:
        kw["topic_prefix"] = prefix
    return KafkaConfig(**kw)


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "?"


@app.command("list")
def list_(limit: Annotated[int, typer.Option("--limit", min=1, help="Most records to show.")] = 100,
          reason: Annotated[Optional[str], typer.Option("--reason", help="Only records whose reason contains TEXT.")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
          wide: Annotated[bool, typer.Option("--wide", help="One line per record, however long (for grep).")] = False,
          bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False) -> None:
    """List dead-lettered messages: where they came from and why they were refused.

    Each record shows its ref (for `kflow dlq replay --ref`), time, key and origin, then its
    reason in full: wrapped under the record, at the end of its one line with --wide, and as
    the "reason" field with --json.

    Example: kflow dlq list --reason "unknown workflow"
    """
    setup_logging(verbose)
    records = [r for r in read_dlq(_config(bootstrap, prefix), limit=10_000) if not reason or reason in r.reason][:limit]
    if as_json:
        for r in records:
            typer.echo(dump_json({"ref": r.ref, "key": (r.key or b"").decode("utf-8", "replace"), "reason": r.reason,
                                  "original": f"{r.original_topic}[{r.original_partition}]@{r.original_offset}",
                                  "time_ms": r.time_ms}))
        return
    print_records(records, Console(soft_wrap=wide), wide)


def print_records(records: list[DlqRecord], console: Console, wide: bool = False) -> None:
    """Each record as a line of ref, time, key and origin, then its whole reason.

    The reason wraps to the terminal under its record (indented); with ``wide`` it ends the
    record's line instead, however long, so ``grep`` sees one line per record.
    """
    console.print(Text(f"dead letters ({len(records)})", style="bold"))
    for r in records:
        line = Text.assemble((r.ref, "bold"), "  ", _when(r.time_ms), " UTC  key ",
                             ((r.key or b"").decode("utf-8", "replace"), "cyan"),
                             f"  from {r.original_topic}[{r.original_partition}]@{r.original_offset}")
        if wide:
            console.print(line + Text("  ") + Text(r.reason, style="red"), no_wrap=True, overflow="ignore", crop=False)
        else:
            console.print(line, overflow="fold")
            console.print(Padding(Text(r.reason, style="red"), (0, 0, 0, 4), expand=False), overflow="fold")


@app.command("replay")
def replay_(ref: Annotated[Optional[list[str]], typer.Option("--ref", help="partition:offset on the dlq topic (repeatable).")] = None,
            reason: Annotated[Optional[str], typer.Option("--reason", help="Replay every record whose reason contains TEXT.")] = None,
            all_: Annotated[bool, typer.Option("--all", help="Replay every record on the dlq topic.")] = False,
            bootstrap: Bootstrap = None, prefix: Prefix = None, verbose: Verbose = False) -> None:
    """Re-send selected dead letters to their original topic, after the cause was fixed.

    Select with --ref (from `kflow dlq list`), --reason or --all. The original key, value and
    headers are sent unchanged; the dlq record stays where it is.

    With KFLOW_AUTH=on, KFLOW_TOKEN must name a principal with system:Admin (role system_admin,
    or system:Admin granted in tenant default): commands are re-signed as it, and the replay is
    written to the audit trail.

    Example: kflow dlq replay --reason "unknown workflow 'order'"
    """
    setup_logging(verbose)
    if not (ref or reason or all_):
        fail("choose what to replay: --ref PARTITION:OFFSET, --reason TEXT or --all")
    for r in ref or []:
        if not _valid_ref(r):
            fail(f"--ref expects PARTITION:OFFSET (e.g. 0:42), not {r!r}")
    records = read_dlq(_config(bootstrap, prefix), limit=1_000_000)
    chosen: list[DlqRecord] = [r for r in records if all_ or (ref and r.ref in ref) or (reason and reason in r.reason)]
    missing = sorted(set(ref or []) - {r.ref for r in records})
    if missing:
        fail(f"no dlq record at {', '.join(missing)}")
    try:
        n = replay(_config(bootstrap, prefix), chosen, read_policy=read_policy, source=f"cli:{socket.gethostname()}")
    except KflowError as exc:
        fail(describe(exc))
    typer.echo(f"replayed {n} message(s)")


def _valid_ref(r: str) -> bool:
    p, _, o = r.partition(":")
    return p.isdigit() and o.isdigit()
