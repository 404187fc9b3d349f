"""The journal of a code workflow's current run, as its instance state counts it.

The history of a code instance is its input events (``[type, data, ts, seq]``) and the commands
its code issued (``[kind, name, value]``). They are entries of the instance's journal
(:mod:`kflow.engine.journal`), appended by each decision; the state keeps only how many there are,
how many inputs were delivered and a digest of the inputs, so the state record does not grow with
the history. These helpers append to it, read a run's history back (once per rebuild), and drop a
run's entries when it continues as new or closes. A state written before the journal carries its
history as lists (``inputs``, ``commands``); the first input it receives moves them into the journal.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import orjson

from kflow.engine.journal import COMMAND, INPUT, MEMORY, Append, Entries, Journal, Reset, apply_to
from kflow.engine.run import Run
from kflow.model.errors import KflowError
from kflow.model.messages import JSONDict

__all__ = ["BLOCKED_INFO", "COMMANDS", "COMMAND_COUNT", "DELIVERED", "HistoryUnavailable", "INPUTS", "INPUTS_DIGEST",
           "INPUT_COUNT", "append_commands", "append_input", "end_journal", "history_of", "move_lists_to_journal",
           "open_journal", "position_key", "run_history"]

#: Instance-state fields of a code run (persisted names, never reused): how many inputs and
#: commands the run's journal holds, how many inputs the coroutine has been fed, a digest of the
#: inputs (so a cached machine is resumed only by the exact history it saw), the BLOCKED description.
INPUT_COUNT, COMMAND_COUNT, DELIVERED, INPUTS_DIGEST, BLOCKED_INFO = (
    "input_count", "command_count", "delivered", "inputs_digest", "blocked")
#: The history lists of states written before the journal; only read, and moved into the journal.
INPUTS, COMMANDS = "inputs", "commands"
#: Every journal field of a state, dropped when the run's journal is.
_JOURNAL_FIELDS = (INPUTS, COMMANDS, INPUT_COUNT, COMMAND_COUNT, DELIVERED, INPUTS_DIGEST)


class HistoryUnavailable(KflowError):
    """The history needed to replay ``instance_id`` is not there (a closed instance, or another
    process's journal)."""

    type = "HistoryUnavailable"

    def __init__(self, instance_id: str, reason: str) -> None:
        self.instance_id, self.reason = instance_id, reason
        super().__init__(f"instance {instance_id}: cannot replay its history: {reason}")


def position_key(seq: int, st: JSONDict) -> tuple[Any, ...]:
    """Where a machine stands: the instance's seq, its journal counts and the digest of its inputs."""
    return (seq, st[INPUT_COUNT], st[COMMAND_COUNT], st[INPUTS_DIGEST])


# -- the journal of the current run ----------------------------------------------------------------
def open_journal(st: JSONDict) -> None:
    """Start the journal counters of a new run at zero."""
    st[INPUT_COUNT], st[COMMAND_COUNT], st[DELIVERED], st[INPUTS_DIGEST] = 0, 0, 0, ""


def _digest(prev: str, entry: list[Any]) -> str:
    return hashlib.blake2b(prev.encode() + orjson.dumps(entry), digest_size=8).hexdigest()


def append_input(run: Run, entry: list[Any]) -> None:
    """Journal ``entry`` as the run's next input."""
    st = run.state
    run.journal_ops.append(Append(st["id"], st.get("run", 1), INPUT, st[INPUT_COUNT], entry))
    st[INPUT_COUNT] += 1
    st[INPUTS_DIGEST] = _digest(st[INPUTS_DIGEST], entry)


def append_commands(run: Run, entries: Entries) -> None:
    """Journal ``entries`` as the run's next commands."""
    st = run.state
    number = st.get("run", 1)
    for entry in entries:
        run.journal_ops.append(Append(st["id"], number, COMMAND, st[COMMAND_COUNT], entry))
        st[COMMAND_COUNT] += 1


def move_lists_to_journal(run: Run) -> None:
    """Move the history lists of a state written before the journal into the journal (once)."""
    st = run.state
    if INPUTS not in st:
        return
    inputs, commands, delivered = st.pop(INPUTS), st.pop(COMMANDS), st[DELIVERED]
    open_journal(st)
    for entry in inputs:
        append_input(run, entry)
    append_commands(run, commands)
    st[DELIVERED] = delivered


def end_journal(run: Run) -> None:
    """The current run's history is no longer needed (it closed or continued as new): delete its
    journal entries and drop the journal fields from the state."""
    st = run.state
    if INPUT_COUNT in st:
        run.journal_ops.append(Reset(st["id"], st.get("run", 1), st[INPUT_COUNT], st[COMMAND_COUNT]))
    for name in _JOURNAL_FIELDS:
        st.pop(name, None)


def _counted(st: JSONDict, inputs: Entries, commands: Entries) -> tuple[Entries, Entries]:
    """The first entries the state counts; fewer than that means this is not the instance's journal."""
    n_inputs, n_commands = st[INPUT_COUNT], st[COMMAND_COUNT]
    if len(inputs) < n_inputs or len(commands) < n_commands:
        raise HistoryUnavailable(st["id"], f"its state counts {n_inputs} inputs and {n_commands} commands of run "
                                           f"{st.get('run', 1)}, but the journal holds {len(inputs)} and "
                                           f"{len(commands)} (ask the engine that owns it: Client.query)")
    del inputs[n_inputs:], commands[n_commands:]
    return inputs, commands


def run_history(run: Run, journaled: bool) -> tuple[Entries, Entries]:
    """The current run's inputs and commands: the journal (when entries of it were ``journaled``
    before this decision), plus what this decision appended."""
    st = run.state
    iid, number = st["id"], st.get("run", 1)
    inputs, commands = run.journal.read(iid, number) if journaled else ([], [])
    apply_to(inputs, commands, run.journal_ops, iid, number)
    return _counted(st, inputs, commands)


def history_of(state: JSONDict, journal: Optional[Journal] = None) -> tuple[Entries, Entries]:
    """The recorded (inputs, commands) of an instance's current run, read from ``journal`` (the
    process's in-memory journal by default), or from the state itself when it predates the journal.

    Raises:
        HistoryUnavailable: the instance is closed (its history is deleted at close), or the
            journal does not hold its history.
    """
    if INPUTS in state:
        return state[INPUTS], state[COMMANDS]
    if INPUT_COUNT not in state:
        raise HistoryUnavailable(state["id"], f"it is {state['status']}, and the history of a code workflow is "
                                              "kept for replay only while it runs")
    journal = journal if journal is not None else MEMORY
    return _counted(state, *journal.read(state["id"], state.get("run", 1)))

