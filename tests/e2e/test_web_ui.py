"""The web chat UI in a real browser (Debian's chromium, headless, driven by Playwright).

Streaming, Stop and resume run against the real embedded model (a ``tokenwire serve``
subprocess); a network drop is a TCP proxy that resets every connection. Hostile HTML, tool
calls and partial JSON come from a scripted backend behind the real app (create_app under
uvicorn), because the model cannot be made to write them on demand. Screenshots land in
tests/artifacts/.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.conftest import ARTIFACTS, RunningServer, tokenwire_server
from tests.e2e.webui_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DEMO_MARKDOWN,
    GUARD,
    GUARDED_ANSWER,
    HOSTILE_MARKDOWN,
    CuttableProxy,
    ScriptedBackend,
    ThreadedServer,
    joined_text,
    native_events,
    scripted_server,
)
from tokenwire.events import (
    EVENT_TYPES,
    TERMINAL_TYPES,
    GuardTriggered,
    StreamCancelled,
    StreamCompleted,
    TextDelta,
    Usage,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
]

STATIC = Path(__file__).resolve().parents[2] / "src" / "tokenwire" / "server" / "static"


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def model_server() -> Iterator[RunningServer]:
    """The real embedded model. Disconnect grace stays at its default (30 s): a dropped
    browser has time to come back and resume, as in production."""
    with tokenwire_server("--heartbeat", "1") as running:
        yield running


@pytest.fixture(scope="module")
def scripted() -> Iterator[ThreadedServer]:
    with scripted_server(ScriptedBackend(), guard=[GUARD]) as running:
        yield running


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    contexts = []

    def open_page(url: str, **context_options: Any) -> Page:
        context = browser.new_context(**context_options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors  # type: ignore[attr-defined]
        page.goto(url)
        page.wait_for_function("() => document.documentElement.dataset.ready === 'true'")
        page.wait_for_function("() => document.getElementById('model').dataset.ready === 'true'")
        return page

    yield open_page
    for context in contexts:
        context.close()


# -- helpers ---------------------------------------------------------------------------


def set_settings(page: Page, *, system: str = "", max_tokens: int | None = None) -> None:
    page.get_by_role("button", name="Settings").click()
    page.get_by_role("textbox", name="System prompt").fill(system)
    page.get_by_role("spinbutton", name="Max tokens").fill(str(max_tokens or ""))
    page.get_by_role("spinbutton", name="Temperature").fill("0")
    page.get_by_role("button", name="Settings").click()


def send(page: Page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def last_answer(page: Page) -> Any:
    return page.locator("article.assistant").last


def wait_state(page: Page, states: str, timeout: float = 90_000) -> str:
    """Waits until the last answer's data-state is one of ``states`` (space separated)."""
    page.wait_for_function(
        """(states) => {
          const a = [...document.querySelectorAll('article.assistant')].pop();
          return a && states.split(' ').includes(a.dataset.state);
        }""",
        arg=states,
        timeout=timeout,
    )
    state: str = last_answer(page).get_attribute("data-state")
    return state


def stored_answer(page: Page) -> dict[str, Any]:
    """The last answer as kept in localStorage (the raw markdown, not the rendered DOM)."""
    message: dict[str, Any] = page.evaluate(
        """() => {
          const convs = JSON.parse(localStorage.getItem('tokenwire.conversations.v1'));
          return convs[0].messages[convs[0].messages.length - 1];
        }"""
    )
    return message


def fresh_render(page: Page, text: str) -> str:
    """The DOM a one-shot render of ``text`` makes, to compare with the streamed one."""
    html: str = page.evaluate(
        """async (text) => {
          const md = await import('/static/markdown.js');
          const div = document.createElement('div');
          div.append(md.renderMarkdown(text));
          return div.innerHTML;
        }""",
        text,
    )
    return html


def answer_html(page: Page) -> str:
    html: str = last_answer(page).locator(".msg-body").inner_html()
    return html


def install_growth_recorder(page: Page) -> None:
    """Records (time, text length, state) of the last answer at every DOM change, and
    marks the answer's first block so we can tell later whether it was ever replaced."""
    page.evaluate(
        """() => {
          window.__growth = [];
          const log = document.getElementById('messages');
          new MutationObserver(() => {
            const a = [...log.querySelectorAll('article.assistant')].pop();
            if (!a) return;
            const body = a.querySelector('.msg-body');
            window.__growth.push([performance.now(), body.textContent.length, a.dataset.state]);
            if (body.children.length > 1 && !window.__firstBlock) {
              window.__firstBlock = body.children[0];
            }
          }).observe(log, {subtree: true, childList: true, characterData: true,
                           attributes: true});
        }"""
    )


# -- the page itself -------------------------------------------------------------------


def test_page_is_served_with_a_strict_csp(scripted: ThreadedServer) -> None:
    page = httpx.get(f"{scripted.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in [("app.js", "javascript"), ("markdown.js", "javascript"), ("app.css", "css")]:
        asset = httpx.get(f"{scripted.url}/static/{name}")
        assert asset.status_code == 200, name
        assert kind in asset.headers["content-type"]
        assert asset.headers["content-security-policy"] == csp
    assert httpx.get(f"{scripted.url}/static/nope.js").status_code == 404
    assert httpx.get(f"{scripted.url}/static/../ui.py").status_code == 404


def test_static_files_fetch_nothing_and_never_parse_html() -> None:
    """Everything ships in the package; no script hands a string to an HTML parser."""
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "app.css", "markdown.js"}
    for path in files:
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path.name
        assert "@import" not in text and "url(http" not in text, path.name
        if path.suffix == ".js":
            sinks = re.findall(
                r"\.(?:inner|outer)HTML\b|insertAdjacentHTML|document\.write|DOMParser"
                r"|createContextualFragment|\bsrcdoc\b|setAttribute\(\s*[\"']on",
                text,
            )
            assert sinks == [], f"{path.name} uses {sinks}"
            assert not re.search(r"\beval\(|new Function\(", text), path.name
        if path.suffix == ".html":
            assert "<script>" not in text and "style=" not in text, "inline code in the page"


@pytest.mark.timeout(120)
def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    """``make serve`` from a built package needs no npm: the static files are in the wheel."""
    import subprocess
    import sys
    import zipfile

    root = STATIC.parents[3]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        timeout=110,
    )
    (wheel,) = tmp_path.glob("tokenwire-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in STATIC.iterdir():
        assert f"tokenwire/server/static/{path.name}" in names


# -- streaming with the real model -----------------------------------------------------


@pytest.mark.timeout(240)
def test_answer_grows_token_by_token_and_ends_identical(
    model_server: RunningServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(f"{model_server.url}/?model=default")
    set_settings(page, max_tokens=40)
    install_growth_recorder(page)
    send(page, "Write a short poem about the sea, in three stanzas.")
    assert wait_state(page, "done failed stopped", timeout=200_000) == "done"

    growth = page.evaluate("window.__growth")
    streaming_lengths = sorted({length for _, length, state in growth if state == "streaming"})
    # Several distinct, growing observations before the answer completed.
    assert len([n for n in streaming_lengths if n > 0]) >= 3, streaming_lengths
    done_at = min(t for t, _, state in growth if state == "done")
    first_text_at = min(t for t, length, _ in growth if length > 0)
    assert first_text_at < done_at

    message = stored_answer(page)
    events = native_events(model_server.url, message["streamId"])
    assert events[-1]["type"] == StreamCompleted.type
    assert message["content"] == joined_text(events)
    assert message["content"].strip()
    # Streamed DOM == a fresh render of the final text: incremental rendering is exact.
    assert answer_html(page) == fresh_render(page, message["content"])
    # Settled blocks were rendered once and never replaced.
    if page.evaluate("!!window.__firstBlock"):
        assert page.evaluate(
            "window.__firstBlock === [...document.querySelectorAll('article.assistant')]"
            ".pop().querySelector('.msg-body').children[0]"
        )
    meta = last_answer(page).locator(".msg-meta").inner_text()
    assert re.search(r"TTFT [\d,]+ ms · [\d.,]+ tok/s · \d+ tokens", meta), meta
    usage = next(e for e in events if e["type"] == Usage.type)
    assert f"{usage['completion_tokens']} tokens" in meta
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.timeout(180)
def test_stop_stops_decoding_on_the_server(
    model_server: RunningServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(model_server.url)
    set_settings(page, max_tokens=1500)
    send(page, "Tell me a very long story about a dragon who learns to cook.")
    stop = page.get_by_role("button", name="Stop")
    assert stop.is_visible()
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('article.assistant')].pop();"
        " return a && a.querySelector('.msg-body').textContent.length > 40; }",
        timeout=120_000,
    )
    seen_seq = int(last_answer(page).get_attribute("data-last-seq"))
    stop.click()
    assert wait_state(page, "stopped done failed", timeout=30_000) == "stopped"
    assert page.get_by_role("button", name="Send").is_visible()
    assert not stop.is_visible()

    message = stored_answer(page)
    events = native_events(model_server.url, message["streamId"])
    assert events[-1] == {**events[-1], "type": StreamCancelled.type, "reason": "stop"}
    after_stop = [e for e in events if e["type"] == TextDelta.type and e["seq"] > seen_seq]
    # The server stopped decoding: only the tokens already in flight followed.
    assert len(after_stop) <= 30, len(after_stop)
    usage = [e for e in events if e["type"] == Usage.type]
    if usage:
        assert usage[-1]["completion_tokens"] < 1500
    assert message["content"] == joined_text(events)
    assert "Stopped" in last_answer(page).locator(".msg-meta").inner_text()
    deadline = time.monotonic() + 10
    while httpx.get(f"{model_server.url}/healthz").json()["active_streams"] and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert httpx.get(f"{model_server.url}/healthz").json()["active_streams"] == 0


@pytest.fixture
def proxy(model_server: RunningServer) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(model_server.port)
    yield proxy
    proxy.close()


def wait_for_text(page: Page, chars: int, timeout: float = 120_000) -> None:
    page.wait_for_function(
        """(n) => { const a = [...document.querySelectorAll('article.assistant')].pop();
           return a && a.dataset.state === 'streaming'
             && a.querySelector('.msg-body').textContent.length > n; }""",
        arg=chars,
        timeout=timeout,
    )


def drop_connection(
    page: Page, proxy: CuttableProxy, outage: float, screenshot: str | None = None
) -> None:
    """Cuts the network mid-answer; checks the page shows it is reconnecting."""
    proxy.cut()
    status = page.get_by_role("status")
    page.wait_for_function(
        "() => document.querySelector('article.assistant:last-of-type')"
        ".dataset.connection === 'reconnecting'",
        timeout=15_000,
    )
    assert "Reconnecting" in status.inner_text()
    assert last_answer(page).evaluate("a => a.classList.contains('reconnecting')")
    if screenshot:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / screenshot))
    time.sleep(outage)
    proxy.restore()


@pytest.mark.timeout(240)
def test_network_drop_resumes_with_identical_text(
    model_server: RunningServer, proxy: CuttableProxy, open_page: Callable[..., Page]
) -> None:
    page = open_page(proxy.url)
    resumes: list[str] = []
    page.on(
        "request",
        lambda r: resumes.append(r.url) if re.search(r"/v1/streams/[^/]+\?after=", r.url) else None,
    )
    set_settings(page, max_tokens=48)
    send(page, "Explain in a few paragraphs how tides work.")
    wait_for_text(page, 12)
    before_drop = last_answer(page).locator(".msg-body").inner_text()
    drop_connection(page, proxy, outage=1.5, screenshot="web-ui-reconnecting.png")
    assert wait_state(page, "done failed stopped", timeout=200_000) == "done"

    assert proxy.refused >= 1  # the page really tried while the network was down
    assert resumes, "the page never resumed"
    after = int(re.search(r"after=(-?\d+)", resumes[0]).group(1))  # type: ignore[union-attr]
    assert after > 0
    message = stored_answer(page)
    events = native_events(model_server.url, message["streamId"])
    assert events[-1]["type"] == StreamCompleted.type
    # Identical: nothing lost, nothing shown twice.
    assert message["content"] == joined_text(events)
    assert answer_html(page) == fresh_render(page, message["content"])
    final_text = last_answer(page).locator(".msg-body").inner_text()
    assert final_text.startswith(before_drop[: max(0, len(before_drop) - 40)])
    assert page.get_by_role("status").inner_text() in ("", "Answer complete.", "Reconnected.")
    assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.timeout(180)
def test_stop_works_on_a_resumed_stream_and_while_offline(
    model_server: RunningServer, proxy: CuttableProxy, open_page: Callable[..., Page]
) -> None:
    page = open_page(proxy.url)
    set_settings(page, max_tokens=1500)
    send(page, "Write a long essay about the history of bread.")
    wait_for_text(page, 20)
    drop_connection(page, proxy, outage=0.5)
    # Resumed: events flow again on a new connection.
    page.wait_for_function(
        "() => document.querySelector('article.assistant:last-of-type').dataset.connection"
        " === 'streaming'",
        timeout=30_000,
    )
    seq = int(last_answer(page).get_attribute("data-last-seq"))
    page.wait_for_function(
        "(seq) => +document.querySelector('article.assistant:last-of-type')"
        ".dataset.lastSeq > seq + 3",
        arg=seq,
        timeout=60_000,
    )
    # Offline again, and Stop pressed while offline: sent once the page is back.
    proxy.cut()
    page.wait_for_function(
        "() => document.querySelector('article.assistant:last-of-type').dataset.connection"
        " === 'reconnecting'",
        timeout=15_000,
    )
    page.get_by_role("button", name="Stop").click()
    time.sleep(0.5)
    proxy.restore()
    assert wait_state(page, "stopped done failed", timeout=60_000) == "stopped"
    message = stored_answer(page)
    events = native_events(model_server.url, message["streamId"])
    assert events[-1]["type"] == StreamCancelled.type
    assert events[-1]["reason"] == "stop"
    assert message["content"] == joined_text(events)


# -- untrusted output, tools, the page's controls (scripted backend) --------------------


def test_model_written_html_and_javascript_links_never_execute(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(f"{scripted.url}/?model=scripted")
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    popups: list[str] = []
    page.context.on("page", lambda p: popups.append(p.url))
    send(page, "be hostile")
    assert wait_state(page, "done failed stopped", timeout=30_000) == "done"
    body = last_answer(page).locator(".msg-body")

    def assert_inert() -> None:
        assert page.evaluate("window.__pwned") is None
        assert dialogs == []
        found = page.evaluate(
            """() => {
              const root = document.getElementById('messages');
              const tags = [...root.querySelectorAll(
                'script, img, iframe, svg, object, embed, style, form, input, b, math')]
                .map(e => e.tagName);
              const handlers = [...root.querySelectorAll('*')].flatMap(e =>
                [...e.attributes].map(a => a.name).filter(n => n.startsWith('on')));
              const hrefs = [...root.querySelectorAll('[href], [src], [srcdoc]')]
                .map(e => e.getAttribute('href') || e.getAttribute('src') || 'srcdoc');
              return {tags, handlers, hrefs};
            }"""
        )
        assert found["tags"] == [] and found["handlers"] == [], found
        assert found["hrefs"] == ["https://example.com/docs"], found

    assert_inert()
    # The HTML is shown as text, the markdown around it still renders.
    text = body.inner_text()
    assert "<script>window.__pwned='script'" in text
    assert "<img src=x onerror=" in text
    assert body.locator("strong", has_text="hostile").count() == 1
    assert body.locator(".codeblock code", has_text="<script>").count() == 1
    # Unsafe links keep their words but lose the link; clicking them does nothing.
    blocked = body.locator(".link-blocked")
    assert blocked.count() == 4  # click me, mixed case, data, image (tabbed is not a link)
    for index in range(blocked.count()):
        blocked.nth(index).click()
    body.get_by_text("raw anchor").click()
    body.get_by_text("hover me").hover()
    assert_inert()
    # Rendered again from localStorage after a reload: still inert.
    assert stored_answer(page)["content"] == HOSTILE_MARKDOWN
    page.reload()
    page.wait_for_function("() => document.documentElement.dataset.ready === 'true'")
    assert last_answer(page).locator(".msg-body").inner_text() == text
    assert_inert()
    assert popups == []
    assert page.errors == []  # type: ignore[attr-defined]


def test_tool_call_progress_and_partial_json_show_while_streaming(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    gates = {"args": threading.Event(), "json": threading.Event()}
    scripted.backend.gates = gates
    try:
        page = open_page(f"{scripted.url}/?model=scripted")
        page.evaluate(
            """() => { window.__args = [];
              new MutationObserver(() => {
                const pre = document.querySelector('article.assistant .tool-args');
                if (pre) window.__args.push(pre.textContent.length);
              }).observe(document.getElementById('messages'),
                         {subtree: true, childList: true, characterData: true}); }"""
        )
        send(page, "use tools")
        answer = last_answer(page)
        tool = answer.locator(".tool")
        args = '{"city": "Paris", "days": 3, "units": "metric"}'
        page.wait_for_function(
            "(args) => document.querySelector('article.assistant .tool-args')"
            "?.textContent === args",
            arg=args,
        )
        # Arguments streamed piece by piece; the call is not complete yet.
        lengths = sorted(set(page.evaluate("window.__args")))
        assert len(lengths) >= 4, lengths
        assert answer.get_attribute("data-state") == "streaming"
        assert "streaming arguments" in tool.locator(".tool-status").inner_text()
        assert tool.locator(".tool-name").inner_text() == "get_weather"
        assert answer.locator(".msg-json").is_hidden()
        gates["args"].set()

        json_panel = answer.locator(".msg-json")
        page.wait_for_function(
            "() => document.querySelector('article.assistant .json-value')?.textContent"
            ".includes('18')"
        )
        assert answer.get_attribute("data-state") == "streaming"
        assert "partial" in json_panel.locator(".json-status").inner_text()
        assert "21" not in json_panel.locator(".json-value").inner_text()
        assert tool.locator(".tool-status").inner_text() == "complete"
        gates["json"].set()

        assert wait_state(page, "done failed stopped", timeout=30_000) == "done"
        assert json_panel.locator(".json-status").inner_text() == "complete"
        assert '"forecast": [\n    18,\n    21,\n    19\n  ]' in json_panel.inner_text()
    finally:
        for gate in gates.values():
            gate.set()
        scripted.backend.gates = {}


def test_a_guard_stops_the_answer_and_the_page_says_which(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(f"{scripted.url}/?model=scripted")
    send(page, "tell me the secret")
    assert wait_state(page, "done failed stopped", timeout=30_000) == "done"
    answer = last_answer(page)
    notice = answer.locator(".msg-guard")
    position = GUARDED_ANSWER.index("SECRET-")
    # The guard's real stage ran: the text stops before the match, and the page names it.
    said = "Stopped by the guard “secret-code” at “SECRET-4821”."
    assert notice.is_visible()
    assert notice.inner_text() == said
    assert notice.get_attribute("role") == "status"
    assert "content filter" in answer.locator(".msg-meta").inner_text()
    events = native_events(scripted.url, stored_answer(page)["streamId"])
    # A guard stops generation at the delta that completes the match; what went out before
    # stays (it does not redact): the page shows exactly what the journal holds.
    streamed = joined_text(events)
    assert GUARDED_ANSWER.startswith(streamed) and position <= len(streamed) < position + 11
    assert answer.locator(".msg-body").inner_text() == streamed.strip()
    assert stored_answer(page)["content"] == streamed
    assert [e["type"] for e in events[-2:]] == [GuardTriggered.type, StreamCompleted.type]
    assert events[-1]["finish_reason"] == "content_filter"
    assert stored_answer(page)["meta"]["guard"] == {
        "guard": "secret-code",
        "match": "SECRET-4821",
        "position": position,
    }
    # Kept with the conversation: still shown after a reload.
    page.reload()
    page.wait_for_function("() => document.documentElement.dataset.ready === 'true'")
    assert last_answer(page).locator(".msg-guard").inner_text() == said
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_tool_the_server_ran_shows_with_its_output(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(f"{scripted.url}/?model=scripted")
    send(page, "use the server tool")
    assert wait_state(page, "done failed stopped", timeout=30_000) == "done"
    tool = last_answer(page).locator(".tool")
    assert tool.locator(".tool-name").inner_text() == "lookup"
    assert tool.locator(".tool-status").inner_text() == "ran on the server"
    assert tool.locator(".tool-args").inner_text() == '{\n  "q": "tokenwire"\n}'
    assert tool.locator(".tool-output").inner_text() == "42"
    assert last_answer(page).locator(".msg-body").inner_text() == "Looking it up. Found 42."
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_ui_handles_every_event_type_of_the_vocabulary() -> None:
    """app.js renders each type events.py defines, and stream.js ends on exactly its
    terminal types: a new event type fails here until the page knows it."""
    app = (STATIC / "app.js").read_text()
    handled = set(re.findall(r'^\s*case "([a-z_.]+)":', app, re.MULTILINE))
    assert handled == set(EVENT_TYPES)
    stream = (STATIC / "stream.js").read_text()
    terminal = re.search(r"const TERMINAL = new Set\(\[([^\]]*)\]\)", stream)
    assert terminal is not None
    assert set(re.findall(r'"([a-z_.]+)"', terminal.group(1))) == TERMINAL_TYPES


def test_composer_keyboard_conversations_model_and_system_prompt(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(f"{scripted.url}/?model=scripted-2")
    assert page.get_by_role("combobox", name="Model").input_value() == "scripted-2"
    options = page.get_by_role("combobox", name="Model").locator("option").all_inner_texts()
    assert options[:3] == ["default", "scripted", "scripted-2"]
    set_settings(page, system="Answer like a pirate.")
    bodies: list[Any] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.method == "POST" else None)

    box = page.get_by_role("textbox", name="Message")
    box.focus()
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert box.input_value() == "first line\nsecond line"
    assert page.locator("article").count() == 0  # Shift+Enter did not send
    page.keyboard.press("Enter")
    assert wait_state(page, "done", timeout=30_000) == "done"
    assert box.input_value() == ""
    user = page.locator("article.user .msg-body")
    assert user.inner_text() == "first line\nsecond line"
    echo = stored_answer(page)["content"]
    assert "scripted-2" in echo and "Answer like a pirate." in echo and "turn 1" in echo
    request = next(b for b in bodies if b and "messages" in b)
    assert request["messages"][0] == {"role": "system", "content": "Answer like a pirate."}
    assert request["model"] == "scripted-2" and request["stream"] is True

    # Keyboard only: Tab from the message box reaches the buttons.
    box.focus()
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.textContent.trim()")
    assert focused in {"Regenerate", "Send"}

    # Regenerate replaces the last answer.
    page.get_by_role("button", name="Regenerate").click()
    assert wait_state(page, "done", timeout=30_000) == "done"
    assert page.locator("article.assistant").count() == 1
    assert page.locator("article.user").count() == 1

    # A second turn carries the history.
    send(page, "and again")
    page.wait_for_function("() => document.querySelectorAll('article.assistant').length === 2")
    assert wait_state(page, "done", timeout=30_000) == "done"
    assert "turn 2" in stored_answer(page)["content"]

    # New chat, then the old conversation is still there after a reload.
    page.get_by_role("button", name="New chat").click()
    assert page.locator("article").count() == 0
    send(page, "another topic")
    assert wait_state(page, "done", timeout=30_000) == "done"
    page.reload()
    page.wait_for_function("() => document.documentElement.dataset.ready === 'true'")
    conversations = page.get_by_role("navigation", name="Saved conversations")
    titles = conversations.locator("button.conv").all_inner_texts()
    assert titles == ["another topic", "first line second line"]
    conversations.get_by_role("button", name="first line second line", exact=True).click()
    assert page.locator("article.user").count() == 2
    assert page.locator("article.assistant .msg-body").first.inner_text().startswith("Echo")
    page.get_by_role("button", name="Delete conversation: another topic").click()
    assert conversations.locator("button.conv").all_inner_texts() == ["first line second line"]


@pytest.mark.timeout(180)
def test_screenshots_desktop_and_phone_light_and_dark(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    sizes = {"desktop": {"width": 1280, "height": 860}, "phone": {"width": 390, "height": 844}}
    for size, viewport in sizes.items():
        for scheme in ("light", "dark"):
            page = open_page(
                f"{scripted.url}/?model=scripted",
                viewport=viewport,
                color_scheme=scheme,
                device_scale_factor=1,
                is_mobile=size == "phone",
                has_touch=size == "phone",
            )
            send(page, "show me a demo")
            assert wait_state(page, "done", timeout=30_000) == "done"
            send(page, "use tools")
            page.wait_for_function(
                "() => document.querySelectorAll('article.assistant').length === 2"
            )
            assert wait_state(page, "done", timeout=30_000) == "done"
            assert stored_answer(page)["content"] == "Checking the weather."
            # Readable at phone width: nothing wider than the screen but code/tables,
            # which scroll inside their own box.
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{size}/{scheme}: page scrolls sideways by {overflow}px"
            page.evaluate("document.getElementById('messages').scrollTop = 0")
            page.screenshot(path=str(ARTIFACTS / f"web-ui-{size}-{scheme}.png"))
            if size == "phone" and scheme == "light":
                page.get_by_role("button", name="Conversations").click()
                page.wait_for_timeout(300)
                page.screenshot(path=str(ARTIFACTS / "web-ui-phone-sidebar.png"))
            assert page.errors == []  # type: ignore[attr-defined]


def test_reloading_mid_answer_resumes_the_stream(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(f"{scripted.url}/?model=scripted")
    resumes: list[str] = []
    page.on("request", lambda r: resumes.append(r.url) if "?after=" in r.url else None)
    prompt = " ".join(f"word{i}" for i in range(120))
    send(page, prompt)
    page.wait_for_function(
        "() => document.querySelector('article.assistant .msg-body').textContent.length > 60"
    )
    page.reload()
    page.wait_for_function("() => document.documentElement.dataset.ready === 'true'")
    assert wait_state(page, "done failed stopped", timeout=30_000) == "done"
    assert resumes and int(resumes[0].rsplit("after=", 1)[1]) > 0
    message = stored_answer(page)
    events = native_events(scripted.url, message["streamId"])
    assert message["content"] == joined_text(events)
    assert message["content"].endswith("word119")
    assert answer_html(page) == fresh_render(page, message["content"])


def test_code_blocks_are_highlighted_with_a_copy_button(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(f"{scripted.url}/?model=scripted")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    send(page, "demo")
    assert wait_state(page, "done", timeout=30_000) == "done"
    block = last_answer(page).locator(".codeblock")
    assert block.locator(".codeblock-lang").inner_text() == "Python"
    code = block.locator("code")
    assert code.locator(".tok-keyword", has_text="def").count() == 1
    assert code.locator(".tok-string", has_text='"POST"').count() == 1
    assert code.locator(".tok-comment").first.inner_text() == "# Print tokens as they arrive."
    copy = block.get_by_role("button", name="Copy code")
    copy.focus()
    page.keyboard.press("Enter")  # keyboard works as well as a click
    page.wait_for_function(
        "() => document.querySelector('.codeblock .copy').textContent === 'Copied'"
    )
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == code.inner_text()
    assert copied.startswith("import httpx\n\ndef stream(prompt: str) -> None:")


# -- the renderer, in the browser --------------------------------------------------------

MARKDOWN_SAMPLES = [
    DEMO_MARKDOWN,
    GUARD,
    GUARDED_ANSWER,
    HOSTILE_MARKDOWN,
    "# Title\n\nSome *em*, **strong**, ***both***, ~~gone~~, `code`, a_b_c.\n",
    "1. one\n2. two\n   - nested **bold**\n   - more\n3. three\n\n- [x] loose\n\n- item\n",
    "Intro:\n- a\n- b\ncontinued lazily\n\nAfter.\n",
    "~~~\ntilde fence\n```\nstill code\n~~~\n\n```js\nlet s = `multi\nline`; /* c\nd */\n```\n",
    "> quote with `code`\n> > nested\n\n---\n\n| a | b |\n|---|:-:|\n| 1 | 2 |\n",
    "Line with two spaces  \nbreak and a backslash\\\nbreak. Escaped \\*stars\\*.\r\nCRLF line.",
    "Unterminated **bold and an [unclosed link](https://example.com\n\n```python\nopen = 1",
    "Para\n# Heading right after\n```\ncode right after\n```\n* star list\n+ plus list\n",
]


def test_streamed_render_equals_full_render_in_any_chunking(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(scripted.url)
    mismatches = page.evaluate(
        """async (samples) => {
          const md = await import('/static/markdown.js');
          const full = (t) => { const d = document.createElement('div');
                               d.append(md.renderMarkdown(t)); return d.innerHTML; };
          let seed = 7;
          const rand = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
          const bad = [];
          samples.forEach((text, s) => {
            for (const size of [1, 2, 5, 13, 'random']) {
              const d = document.createElement('div');
              const view = new md.StreamingMarkdown(d);
              for (let i = 0; i < text.length;) {
                const n = size === 'random' ? 1 + Math.floor(rand() * 20) : size;
                view.append(text.slice(i, i + n));
                view.flush(true);  // what a frame would show mid-stream
                i += n;
              }
              view.finish();
              if (d.innerHTML !== full(text)) bad.push([s, size, d.innerHTML, full(text)]);
            }
          });
          return bad;
        }""",
        MARKDOWN_SAMPLES,
    )
    assert mismatches == []


def test_incremental_render_is_linear_and_keeps_settled_blocks(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(scripted.url)
    result = page.evaluate(
        """async () => {
          const md = await import('/static/markdown.js');
          const para = (i) => `Paragraph ${i} has **bold** and \\`code\\` in it.\\n\\n`;
          let text = '';
          for (let i = 0; i < 300; i++) text += para(i);
          text += '```python\\n' + 'x = 1  # a line of code\\n'.repeat(400) + '```\\n';
          const d = document.createElement('div');
          const view = new md.StreamingMarkdown(d);
          let first = null;
          let replaced = 0;
          for (let i = 0; i < text.length; i += 3) {
            view.append(text.slice(i, i + 3));
            view.flush(true);
            if (!first && d.children.length > 1) first = d.children[0];
            if (first && d.children[0] !== first) replaced++;
          }
          view.finish();
          return {length: text.length, work: view.work, replaced,
                  same: d.children[0] === first, blocks: d.children.length};
        }"""
    )
    # Linear: each character is (re-)rendered a bounded number of times. A renderer that
    # re-parsed everything per chunk would do ~length^2/6 (millions) here.
    assert result["work"] < 30 * result["length"], result
    assert result["replaced"] == 0 and result["same"], result
    assert result["blocks"] == 301


def test_unfinished_syntax_looks_right_mid_stream(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(scripted.url)
    shown = page.evaluate(
        """async (cases) => {
          const md = await import('/static/markdown.js');
          return cases.map((text) => {
            const d = document.createElement('div');
            const view = new md.StreamingMarkdown(d);
            view.append(text);
            view.flush(true);
            return d.innerHTML;
          });
        }""",
        [
            "Some **bold te",
            "A list:\n- item one\n- it",
            "```python\ndef f():\n    return 1",
            "```python\nx = 1\n``",
            "a `code",
            "[docs](https://exa",
            "ends with *",
            "| h1 | h2 |\n|--",
            "5*3 is",
            "Intro\n*",
            "Steps:\n12",
        ],
    )
    assert shown[0] == "<p>Some <strong>bold te</strong></p>"
    assert shown[1] == "<p>A list:</p><ul><li>item one</li><li>it</li></ul>"
    assert shown[2].startswith('<div class="codeblock open">')
    assert '<span class="tok-keyword">return</span>' in shown[2]
    assert "``" not in shown[3]  # a closing fence being typed is not shown as code
    assert shown[4] == "<p>a <code>code</code></p>"
    assert shown[5] == '<p><span class="link-pending">docs</span></p>'
    assert shown[6] == "<p>ends with </p>"  # a trailing marker is held back
    assert shown[7].startswith('<div class="table-wrap"><table><thead><tr><th>h1</th>')
    assert shown[8] == "<p>5*3 is</p>"  # intraword * is not emphasis-to-be
    assert shown[9] == "<p>Intro</p>"  # "*" may become "**Bold**": no bullet flashes
    assert shown[10] == "<p>Steps:</p>"  # "12" may become "12. item"


def test_only_http_and_mailto_links_survive(
    scripted: ThreadedServer, open_page: Callable[..., Page]
) -> None:
    page = open_page(scripted.url)
    urls = [
        "https://example.com/a",
        "http://x.y",
        "mailto:a@b.c",
        "javascript:alert(1)",
        " JaVaScRiPt:alert(1)",
        "java\tscript:alert(1)",
        "java\nscript:alert(1)",
        "&#106;avascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "vbscript:msgbox(1)",
        "//evil.example/x",
        "/v1/streams",
        "file:///etc/passwd",
    ]
    safe = page.evaluate(
        "async (urls) => { const md = await import('/static/markdown.js');"
        " return urls.map(md.safeUrl); }",
        urls,
    )
    assert safe[:3] == ["https://example.com/a", "http://x.y/", "mailto:a@b.c"]
    assert safe[3:] == [None] * (len(urls) - 3)
