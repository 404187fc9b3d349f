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
