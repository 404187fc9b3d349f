"""The console with ``KFLOW_AUTH=on`` in headless Chromium (Debian's ``chromium``, driven by Playwright).

Log in with the form and get an HttpOnly, SameSite=Strict session cookie; see only the actions
the policy allows (a viewer's buttons are hidden and disabled, an operator's work); a POST
without the session's CSRF token is refused; workflow input, search attributes and error
messages carrying ``<script>`` and ``<img onerror>`` are shown as text: no dialog opens and no
element is injected. Screenshots go to ``tests/artifacts/console-auth/``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kflow.testing import assert_eventually
from tests.integration.auth_http import SecuredStack, secured_stack, token
from tests.integration.test_console_browser import _chromium

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console-auth"
XSS = '<script>window.__pwned = 1; alert(1)</script><img src=x onerror="window.__pwned = 2; alert(2)">'


@pytest.fixture(scope="module")
def sec(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredStack]:
    yield from secured_stack(kafka_bootstrap, tmp_path_factory.mktemp("console-auth"))


@pytest.fixture(scope="module")
def browser(sec: SecuredStack) -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, headless=True,
                               args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) whose dialogs are recorded, then dismissed."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = context.new_page()
    p.set_default_timeout(30_000)
    p.dialogs = []  # type: ignore[attr-defined]

    def on_dialog(d: Any) -> None:
        p.dialogs.append(d.message)  # type: ignore[attr-defined]
        d.dismiss()

    p.on("dialog", on_dialog)
    try:
        yield p
    finally:
        context.close()


def start(sec: SecuredStack, workflow: str, note: str, who: str = "alice") -> str:
    iid = f"ui-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{sec.url}/api/instances", json={"workflow": workflow, "input": {"note": note}, "id": iid},
                   headers={"Authorization": f"Bearer {token(who, 'acme', ('operator',))}"}, timeout=30)
    assert r.status_code == 202, r.text
    return iid


def login(page: Any, sec: SecuredStack, user: str, password: str) -> None:
    from playwright.sync_api import expect

    page.goto(sec.url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    page.fill("#login-user", user)
    page.fill("#login-password", password)
    page.click("#login-submit")
    expect(page.locator("#user")).to_have_text(f"{user}@{'globex' if user == 'mallory' else 'acme'}")


def test_login_form_sets_a_strict_http_only_session_cookie(sec, page):
    from playwright.sync_api import expect

    page.goto(sec.url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    page.fill("#login-user", "alice")
    page.fill("#login-password", "not her password")
    page.click("#login-submit")
    expect(page.locator("#login-msg")).to_contain_text("invalid username or password")
    assert page.context.cookies() == []
    page.screenshot(path=str(ARTIFACTS / "01-login-refused.png"), full_page=True)

    login(page, sec, "alice", "alice-pw")
    expect(page.locator("#instances")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "kflow_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # no script can read it
    page.screenshot(path=str(ARTIFACTS / "02-logged-in.png"), full_page=True)

    page.click("#logout")
    expect(page.locator("#login-form")).to_be_visible()
    page.goto(sec.url + "/#/definitions")
    expect(page.locator("#login-form")).to_be_visible()


def test_buttons_follow_permissions_and_an_operator_can_act(sec, page):
    from playwright.sync_api import expect

    iid = start(sec, "http-wait", "buttons")
    login(page, sec, "victor", "victor-pw")  # a viewer
    page.goto(f"{sec.url}/#/i/{iid}")
    expect(page.locator('#graph g[data-step="w"]')).to_have_attribute("data-state", "running")
    for button in ("#btn-signal", "#btn-cancel", "#btn-terminate"):
        expect(page.locator(button)).to_be_hidden()
        expect(page.locator(button)).to_be_disabled()
    page.screenshot(path=str(ARTIFACTS / "03-viewer-no-buttons.png"), full_page=True)

    page.click("#logout")
    login(page, sec, "alice", "alice-pw")  # an operator
    page.goto(f"{sec.url}/#/i/{iid}")
    expect(page.locator("#btn-signal")).to_be_enabled()
    page.fill("#signal-name", "go")
    page.fill("#signal-data", '{"ok": true}')
    page.click("#btn-signal")
    expect(page.locator("#action-msg")).to_have_text("signal sent")
    expect(page.locator('#summary [data-status="COMPLETED"]')).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "04-operator-signalled.png"), full_page=True)


def test_a_post_without_the_csrf_token_is_refused(sec, page):
    iid = start(sec, "http-wait", "csrf")
    login(page, sec, "alice", "alice-pw")
    assert_eventually(lambda: page.evaluate(
        "async (id) => (await fetch('/api/instances/' + id)).status", iid) == 200, timeout=60)
    # the page's own fetch sends the session cookie; without the header the API refuses it
    answer = page.evaluate("""async (id) => {
        const r = await fetch('/api/instances/' + id + '/terminate', {method: 'POST', credentials: 'same-origin',
            headers: {'Content-Type': 'application/json'}, body: '{}'});
        return [r.status, (await r.json()).error];
    }""", iid)
    assert answer[0] == 403 and "CSRF" in answer[1]
    status = page.evaluate("async (id) => (await (await fetch('/api/instances/' + id)).json()).status", iid)
    assert status == "RUNNING"


def test_markup_in_input_search_attributes_and_errors_is_shown_as_text(sec, page):
    from playwright.sync_api import expect

    waiting = start(sec, "http-wait", XSS)
    failed = start(sec, "http-fail", XSS)
    login(page, sec, "alice", "alice-pw")
    page.fill("#f-id", "ui-")
    page.click("#f-apply")
    expect(page.locator(f'#instances tr[data-id="{waiting}"]')).to_contain_text("<script>")
    expect(page.locator(f'#instances tr[data-id="{failed}"]')).to_contain_text("onerror")
    page.goto(f"{sec.url}/#/i/{failed}")
    expect(page.locator('#summary [data-status="FAILED"]')).to_be_visible()
    expect(page.locator("#summary")).to_contain_text("Boom: <script>")
    page.goto(f"{sec.url}/#/i/{waiting}")
    expect(page.locator("#summary")).to_contain_text("<img src=x onerror=")
    page.screenshot(path=str(ARTIFACTS / "05-markup-as-text.png"), full_page=True)
    assert page.dialogs == []  # type: ignore[attr-defined]
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img").count() == 0 and page.locator("main script").count() == 0
