"""The web UI against a server that requires API keys: it says so, and works once the key
is entered under Settings (kept in the browser, sent as a Bearer token)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from .webui_support import CHROMIUM, CHROMIUM_ARGS, ScriptedBackend, scripted_server

KEY = "tw-test-key-0123456789"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@pytest.mark.timeout(120)
def test_ui_asks_for_the_key_then_streams_with_it(browser: Browser) -> None:
    with scripted_server(ScriptedBackend(), api_keys=[KEY]) as server:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(30_000)
        requests: list[dict[str, str]] = []
        page.on("request", lambda r: requests.append(r.headers) if "/v1/" in r.url else None)
        page.goto(server.url)
        page.wait_for_function("() => document.getElementById('model').dataset.ready === 'true'")
        status = page.locator("#status")
        assert "API key" in status.inner_text()

        page.get_by_role("button", name="Settings").click()
        key_box = page.get_by_label("API key")
        key_box.fill(KEY)
        key_box.press("Tab")  # change event
        box = page.get_by_role("textbox", name="Message")
        box.fill("hello there")
        box.press("Enter")
        page.wait_for_function(
            """() => {
              const a = [...document.querySelectorAll('article.assistant')].pop();
              return a && a.dataset.state === 'done';
            }""",
            timeout=60_000,
        )
        answer = page.locator("article.assistant").last.inner_text()
        assert "hello there" in answer  # the scripted backend echoes the request
        streamed = [h for h in requests if h.get("authorization")]
        assert streamed and all(h["authorization"] == f"Bearer {KEY}" for h in streamed)
        context.close()
