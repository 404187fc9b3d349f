"""The console's Schedules, Incidents and Queues pages in headless Chromium (Debian's ``chromium``,
driven by Playwright): each renders what the API serves, a hostile string in a schedule note and in an
incident's message and instructions is shown as text (no element, no script run), and an incident is
resolved with the page's form. Screenshots are saved under ``tests/artifacts/console/``."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kflow.testing import assert_eventually
from tests.integration.conftest import visibility_server
from tests.integration.test_console_browser import ARTIFACTS, _chromium
from tests.integration.test_console_objects import BROKEN, HOSTILE, ORDER, WAIT


@pytest.fixture
def page(engine_only_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, list[str]]]:
    executable = _chromium()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with visibility_server(engine_only_stack, tmp_path_factory, "cobj-ui") as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            p = browser.new_page(viewport={"width": 1400, "height": 1000})
            p.set_default_timeout(30_000)
            dialogs: list[str] = []  # an alert() run by an injected string would land here
            p.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            yield p, server, dialogs
        finally:
            browser.close()


def test_schedules_incidents_and_queues_pages_render_hostile_strings_as_text(engine_only_stack: Any,
                                                                             page: tuple[Any, Any, list[str]]) -> None:
    from playwright.sync_api import expect

    p, server, dialogs = page
    stack = engine_only_stack
    client = stack.client
    stack.start_worker([sys.modules["tests.integration.test_console_objects"]])
    client.deploy(WAIT)
    client.deploy(ORDER)
    sid = f"ui-{uuid.uuid4().hex[:6]}"
    client.create_schedule(sid, "cobj_wait", every="1h", start="2099-01-01T00:00:00Z")  # no run during the test
    assert_eventually(lambda: sid in client.schedules(), timeout=30)
    client.pause_schedule(sid, HOSTILE)
    assert_eventually(lambda: client.schedules().get(sid, {}).get("paused"), timeout=30)
    iid = f"ui-inc-{uuid.uuid4().hex[:6]}"
    BROKEN[iid] = True
    client.start("cobj_order", {"key": iid}, id=iid)

    # Schedules: the row with its spec, the paused state and the note as text; unpause shows next runs
    p.goto(server.url + "/#/schedules")
    row = p.locator(f'#schedules tr.schedule-row[data-id="{sid}"]')
    expect(row.locator("td.spec")).to_contain_text("every 1h")
    expect(row.locator("td.state")).to_contain_text("paused")
    expect(row.locator("td.state .note")).to_have_text(HOSTILE)
    assert row.locator("img").count() == 0
    expect(row.locator("td.next div")).to_have_count(0)
    p.screenshot(path=str(ARTIFACTS / "10-schedules-paused.png"), full_page=True)
    p.fill("#schedule-note", "resumed")
    row.locator("button.sched-unpause").click()
    expect(row.locator("td.next div")).to_have_count(5)  # refreshed live from the state topic
    expect(row.locator("button.sched-pause")).to_be_visible()

    # Incidents: error, instructions and role as text, then resolved with the form
    p.goto(server.url + "/#/incidents")
    inc = p.locator(f'#incidents tr.incident-row[data-id="{iid}"]')
    expect(inc.locator("td.instructions")).to_have_text(f"restart the card service {HOSTILE}", timeout=60_000)
    expect(inc.locator("td.error")).to_contain_text(f"card service down {HOSTILE}")
    expect(inc.locator("td.role")).to_have_text("ops")
    expect(inc.locator("td.step")).to_contain_text("charge")
    assert inc.locator("img").count() == 0
    p.screenshot(path=str(ARTIFACTS / "11-incidents.png"), full_page=True)
    BROKEN[iid] = False
    inc.locator("select.inc-action").select_option("retry")
    inc.locator("input.inc-reason").fill("fixed")
    inc.locator("button.inc-resolve").click()
    expect(p.locator(f'#incidents tr.incident-row[data-id="{iid}"]')).to_have_count(0, timeout=60_000)
    assert_eventually(lambda: (client.status(iid) or {}).get("status") == "COMPLETED", timeout=60)

    # Queues & quotas: a tenant quota of 1 with two queued starts
    client.apply_limits({"limits": [{"name": "ui-quota", "tenant": "*", "max_running": 1}]})
    assert_eventually(lambda: all(proc.quotas.get("ui-quota") is not None for proc, _ in stack.engines), timeout=30)
    for n in range(3):
        client.start("cobj_wait", None, id=f"ui-q-{n}-{uuid.uuid4().hex[:4]}")
    p.goto(server.url + "/#/queues")
    limit = p.locator('#limits tr.limit-row[data-key="limit:ui-quota:default"]')
    expect(limit.locator("td.queued")).to_contain_text("2", timeout=60_000)
    expect(limit.locator("td.in-use")).to_have_text("1")
    expect(limit.locator("td.allowed")).to_have_text("1")
    expect(p.locator('#levels tr[data-level="normal"] td.starts')).to_have_text("2")
    p.screenshot(path=str(ARTIFACTS / "12-queues.png"), full_page=True)

    assert dialogs == []  # no injected script ran
