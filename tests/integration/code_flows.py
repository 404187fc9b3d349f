"""Code workflows and their activities for the integration tests (an engine hosts this module)."""

from __future__ import annotations

import kflow
from kflow.worker import activity


@activity("co.reserve")
def reserve(order):
    return {"reservation": f"r-{order['sku']}", "qty": order["qty"]}


@activity("co.charge")
def charge(req):
    if req["amount"] > 1000:
        raise kflow.NonRetryableError("card declined", type="Declined")
    return {"receipt": f"p-{req['amount']}"}


@activity("co.release")
def release(reservation):
    return {"released": reservation}


@activity("co.ship", queue="shipping")
def ship(req):
    return {"tracking": f"t-{req['reservation']}-{req['carrier']}"}


@kflow.workflow(name="code.order", version=1)
async def order(ctx, input):
    stage = ["reserving"]
    ctx.set_query_handler("stage", lambda: stage[0])
    r = await ctx.activity("co.reserve", input)
    stage[0] = "charging"
    try:
        paid = await ctx.activity("co.charge", {"amount": input["qty"] * input["price"]})
    except kflow.WorkflowError as e:
        await ctx.activity("co.release", r["reservation"])
        raise kflow.WorkflowError(f"payment failed: {e.message}", type="PaymentFailed") from None
    stage[0] = "awaiting shipment"
    decision = await ctx.wait_signal("ship", timeout=60)
    stage[0] = "shipping"
    await ctx.sleep(0.3)
    shipped, audit = await ctx.gather(
        ctx.activity("co.ship", {"reservation": r["reservation"], "carrier": decision["carrier"]}, queue="shipping"),
        ctx.child("code.audit", {"sku": input["sku"]}))
    return {"receipt": paid["receipt"], "tracking": shipped["tracking"], "audit": audit, "id": str(ctx.uuid4())}


@kflow.workflow(name="code.audit", version=1)
async def audit(ctx, input):
    return f"audited {input['sku']}"


# -- more code workflows: fan-out, signals, sleep, children, queries, retries, continue-as-new ----
@activity("co.square")
def square(x):
    return x * x


_flaky_calls: dict[str, int] = {}


@activity("co.flaky")
def flaky(key):
    """Fails the first two calls per key (retryable), then succeeds."""
    _flaky_calls[key] = _flaky_calls.get(key, 0) + 1
    if _flaky_calls[key] <= 2:
        raise RuntimeError(f"transient failure {_flaky_calls[key]}")
    return _flaky_calls[key]


@kflow.workflow(name="code.fanout", version=1)
async def fanout(ctx, input):
    return await ctx.gather(*(ctx.activity("co.square", i) for i in range(input)))


@kflow.workflow(name="code.signals", version=1)
async def signals(ctx, input):
    first = await ctx.wait_signal("early")  # sent before the workflow waits: buffered
    second = await ctx.wait_signal("late", timeout=60)
    return [first, second]


@kflow.workflow(name="code.sleepy", version=1)
async def sleepy(ctx, input):
    before = ctx.now()
    await ctx.sleep(input)
    return (ctx.now() - before).total_seconds()


@kflow.workflow(name="code.parent", version=1)
async def parent(ctx, input):
    spec_result = await ctx.child("spec.child", {"x": input}, id=f"{ctx.instance_id}-spec")
    code_result = await ctx.child("code.audit", {"sku": f"k{input}"})
    return {"spec": spec_result, "code": code_result}


@kflow.workflow(name="code.approval", version=1)
class Approval:
    def __init__(self):
        self.approvals = []

    @kflow.workflow.signal
    def approve(self, who):
        self.approvals.append(who)

    @kflow.workflow.query
    def approvers(self, prefix=""):
        return [prefix + a for a in self.approvals]

    async def run(self, ctx, input):
        await ctx.wait_condition(lambda: len(self.approvals) >= input["needed"])
        return {"approved_by": self.approvals}


@kflow.workflow(name="code.retrying", version=1)
async def retrying(ctx, input):
    calls = await ctx.activity("co.flaky", input, retry={"initial": 1, "backoff": 1.0, "max_attempts": 5})
    return {"calls": calls}


@kflow.workflow(name="code.counter", version=1)
async def counter(ctx, input):
    total = input["total"] + await ctx.activity("co.square", input["run"])
    if input["run"] < input["runs"]:
        ctx.continue_as_new({"run": input["run"] + 1, "runs": input["runs"], "total": total})
    return {"total": total, "run": ctx.run_number}


@kflow.workflow(name="code.slow", version=1)
async def slow_code(ctx, i):
    a = await ctx.activity("co.square", i)
    await ctx.sleep(3)
    g = await ctx.wait_signal("go", timeout=3600)
    return await ctx.gather(*(ctx.activity("co.square", a + g + k) for k in (1, 2, 3)))
