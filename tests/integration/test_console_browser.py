"""The web console in headless Chromium (Debian's ``chromium``, driven by Playwright; no browser
downloads): filter the list, open an instance, watch the graph highlight move as the workflow
progresses, send a signal with the button and see the workflow complete. Screenshots are saved
under ``tests/artifacts/console/``."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kflow.visibility.server import VisibilityServer
from tests.integration.conftest import visibility_server

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")

WF = {"name": "vis_ui", "version": 1, "steps": [
    {"id": "tag", "set": {"n": "input.n"}, "search": {"customer": "input.customer"}},
    {"id": "reserve", "task": "t.inc", "input": "input.n", "output": "r"},
    {"id": "pack", "wait": {"signal": "packed"}, "output": "p"},
    {"id": "ship", "parallel": [
        {"steps": [{"id": "label", "task": "t.inc", "input": "r", "output": "l"}]},
        {"steps": [{"id": "notify", "task": "t.upper", "queue": "other", "input": "input.customer"}]}]},
    {"id": "confirm", "wait": {"signal": "confirm"}, "output": "c"},
    {"id": "done", "succeed": "{'r': r, 'c': c}"},
]}


def _chromium() -> str:
    found = next((p for p in CHROMIUM_PATHS if Path(p).exists()), None) or shutil.which("chromium")
    if found is None:
        pytest.fail("the console browser test needs Debian's chromium: apt-get install -y chromium chromium-driver "
                    f"(looked for {', '.join(CHROMIUM_PATHS)} and chromium on PATH)")
    return found


@pytest.fixture(scope="module")
def console(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisibilityServer]:
    with visibility_server(stack, tmp_path_factory, "vis-ui") as server:
        yield server


@pytest.fixture(scope="module")
def page(console: VisibilityServer) -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            p = browser.new_page(viewport={"width": 1400, "height": 1000})
            p.set_default_timeout(30_000)
            yield p
        finally:
            browser.close()


@pytest.fixture(autouse=True, scope="module")
def _expect_timeout() -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)


def _state(page: Any, step: str) -> str:
    return page.get_attribute(f'#graph g[data-step="{step}"]', "data-state") or ""


def test_console_filters_opens_an_instance_and_signals_it_to_completion(stack, console, page):
    from playwright.sync_api import expect

    c = stack.client
    c.deploy(WF)
    tag = uuid.uuid4().hex[:6]
    target = f"ui-{tag}"
    c.start("vis_ui", {"customer": f"acme-{tag}", "n": 1}, id=target)
    for i in range(3):
        c.start("vis_ui", {"customer": f"other-{tag}", "n": i}, id=f"ui-other-{i}-{tag}")

    # the list: every instance, then filtered by search attribute and status
    page.goto(console.url + "/")
    expect(page.locator(f'#instances tr[data-id="{target}"]')).to_be_visible()
    expect(page.locator("#instances tr.row")).to_have_count(4)
    page.fill("#f-search", f"customer:acme-{tag}")
    page.select_option("#f-status", "RUNNING")
    page.click("#f-apply")
    expect(page.locator("#instances tr.row")).to_have_count(1)
    expect(page.locator('#counts b[data-count="RUNNING"]')).to_have_text("1")
    page.screenshot(path=str(ARTIFACTS / "01-instances-filtered.png"), full_page=True)

    # the instance: parked on 'pack', the steps before it done
    page.click(f'#instances tr[data-id="{target}"]')
    expect(page.locator('#graph g[data-step="pack"]')).to_have_attribute("data-state", "running")
    assert _state(page, "tag") == "done" and _state(page, "reserve") == "done"
    assert _state(page, "confirm") == "pending"
    expect(page.locator('#timeline li[data-type="ActivityCompleted"]')).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "02-instance-at-pack.png"), full_page=True)

    # progress elsewhere moves the highlight live (server-sent events, no reload)
    c.signal(target, "packed", {"box": 3})
    expect(page.locator('#graph g[data-step="confirm"]')).to_have_attribute("data-state", "running")
    assert _state(page, "pack") == "done" and _state(page, "ship") == "done"
    assert _state(page, "label") == "done" and _state(page, "notify") == "done"
    page.screenshot(path=str(ARTIFACTS / "03-instance-at-confirm.png"), full_page=True)

    # payload on demand
    first = page.locator('#timeline li[data-type="WorkflowStarted"]')
    first.locator("button").click()
    expect(first.locator("pre.payload")).to_contain_text(f"acme-{tag}")

    # the signal button completes it
    page.fill("#signal-name", "confirm")
    page.fill("#signal-data", '{"ok": true}')
    page.click("#btn-signal")
    expect(page.locator("#action-msg")).to_have_text("signal sent")
    expect(page.locator('#summary [data-status="COMPLETED"]')).to_be_visible()
    expect(page.locator('#graph g[data-step="done"]')).to_have_attribute("data-state", "done")
    expect(page.locator("#result")).to_contain_text('"ok": true')
    expect(page.locator("#btn-signal")).to_be_disabled()
    page.screenshot(path=str(ARTIFACTS / "04-instance-completed.png"), full_page=True)
    assert c.status(target)["status"] == "COMPLETED"

    # definitions: each version's graph
    page.goto(console.url + "/#/definitions")
    page.click('#definitions tr[data-name="vis_ui"] a')
    expect(page.locator('#graph g[data-step="ship"]')).to_be_visible()
    expect(page.locator("#graph g.node")).to_have_count(8)
    page.screenshot(path=str(ARTIFACTS / "05-definition-graph.png"), full_page=True)


def test_console_terminate_button(stack, console, page):
    from playwright.sync_api import expect

    iid = f"ui-term-{uuid.uuid4().hex[:6]}"
    stack.client.start("vis_ui", {"customer": "t", "n": 2}, id=iid)
    page.goto(f"{console.url}/#/i/{iid}")
    expect(page.locator('#graph g[data-step="pack"]')).to_have_attribute("data-state", "running")
    page.once("dialog", lambda d: d.accept())
    page.click("#btn-terminate")
    expect(page.locator('#summary [data-status="TERMINATED"]')).to_be_visible()
    expect(page.locator('#graph g[data-step="pack"]')).to_have_attribute("data-state", "failed")
    page.goto(f"{console.url}/#/i/no-such-{iid}")
    expect(page.locator("#not-found")).to_contain_text("no workflow instance")
