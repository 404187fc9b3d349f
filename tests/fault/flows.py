"""Workflows and activities of the crash matrix: a mix of chains, timers, fan-out and children."""

from __future__ import annotations

import time

import kflow
from kflow.worker import activity


@activity("f.inc")
def inc(x):
    return x + 1


@activity("f.slow")
def slow(x):
    time.sleep(0.2)  # long enough that a SIGKILLed worker dies mid-activity
    return x * 2


DEFS = [
    {"name": "f.chain", "version": 1, "steps": [
        {"id": "a", "task": "f.inc", "input": "input", "output": "a"},
        {"id": "b", "task": "f.inc", "input": "a", "output": "b"},
        {"id": "c", "task": "f.slow", "input": "b", "output": "c"},
        {"id": "done", "succeed": "c"}]},
    {"name": "f.nap", "version": 1, "steps": [
        {"id": "a", "task": "f.inc", "input": "input", "output": "a"},
        {"id": "z", "sleep": "700ms"},
        {"id": "done", "succeed": "a * 10"}]},
    {"name": "f.fan", "version": 1, "steps": [
        {"id": "each", "foreach": "[1, 2, 3, 4]", "as": "k", "concurrency": 2,
         "steps": [{"id": "one", "task": "f.inc", "input": "input + k", "output": "o"}], "output": "all"},
        {"id": "done", "succeed": "all"}]},
    {"name": "f.parent", "version": 1, "steps": [
        {"id": "sub", "child": {"workflow": "f.chain", "input": "input"}, "output": "r"},
        {"id": "done", "succeed": "r + 1"}]},
]


@kflow.workflow(name="f.code_chain", version=1)
async def code_chain(ctx, x):
    a = await ctx.activity("f.inc", x)
    await ctx.sleep(0.3)
    return await ctx.activity("f.slow", a)


@kflow.workflow(name="f.code_fan", version=1)
async def code_fan(ctx, x):
    parts = await ctx.gather(*(ctx.activity("f.inc", x + k) for k in (1, 2, 3)))
    sub = await ctx.child("f.chain", x)
    return parts + [sub]


#: Code workflows of the matrix (hosted by the engines with ``--workflows tests.fault.flows``).
CODE = [code_chain, code_fan]


def expected(workflow: str, x: int):
    """The independent oracle's expectation, computed from the input alone."""
    if workflow == "f.code_chain":
        return (x + 1) * 2
    if workflow == "f.code_fan":
        return [x + 2, x + 3, x + 4, (x + 2) * 2]
    if workflow == "f.chain":
        return (x + 2) * 2
    if workflow == "f.nap":
        return (x + 1) * 10
    if workflow == "f.fan":
        return [x + k + 1 for k in (1, 2, 3, 4)]
    if workflow == "f.parent":
        return (x + 2) * 2 + 1
    raise KeyError(workflow)
