"""The playground end to end in a real browser: headless Chromium driven by Playwright against a live
daphne hub, a real node worker, the local Hugging Face endpoint and the real small model.
Screenshots of each stage land in test-output/playground/ (printed at the end of each test)."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from tests.conftest import REPO_ROOT
from tests.fleet.conftest import BROKEN_REPO, offered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
OUTPUT = REPO_ROOT / "test-output" / "playground"
PASSWORD = "a long test password"

DOWNLOAD_LABEL = re.compile(r"^Downloading \d+ MB of 253 MB · \d+\.\d% · \d+(\.\d)? MB/s( · ~\d+ (s|min) left)?$")


def output_dir(name: str) -> Path:
    folder = OUTPUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


class Browser:
    """Playwright's sync API around Debian's Chromium; Playwright cannot download browsers here."""

    def __init__(self, hub_url: str, shots: Path) -> None:
        from playwright.sync_api import sync_playwright

        self.hub_url, self.shots = hub_url, shots
        self._playwright = sync_playwright().start()
        try:
            self.browser = self._playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception:
            self._playwright.stop()
            raise
        self.page = self.browser.new_page(viewport={"width": 1280, "height": 800})
        self.console_errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.failed_responses: list[str] = []
        self.page.on("response", lambda r: self.failed_responses.append(f"{r.status} {r.request.method} {r.url}")
                     if r.status >= 400 else None)
        self.socket_frames: dict[str, int] = {}

        def watch_socket(ws) -> None:
            self.socket_frames.setdefault(ws.url, 0)
            ws.on("framereceived", lambda _: self.socket_frames.__setitem__(ws.url, self.socket_frames[ws.url] + 1))

        self.page.on("websocket", watch_socket)

    def _console(self, message) -> None:
        # The admin's login page has no icon, so Chromium asks for /favicon.ico there.
        if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
            self.console_errors.append(f"{message.text} at {message.location}")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def sign_in(self, username: str) -> None:
        page = self.page
        page.goto(self.hub_url + "/playground/")
        assert "/accounts/login/" in page.url, "the playground is for signed-in people"
        page.fill("#id_username", username)
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_url(self.hub_url + "/playground/")

    def badge(self, model_id: str) -> str:
        return self.page.inner_text(f'.model-item[data-model-id="{model_id}"] .badge')

    def bar(self) -> dict:
        return self.page.evaluate("""() => {
            const bar = document.getElementById('warming');
            return {hidden: bar.hidden, phase: bar.dataset.phase, pct: bar.dataset.pct,
                    label: document.getElementById('warming-label').textContent};
        }""")

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._playwright.stop()


@pytest.fixture
def browser_for(live_hub):
    opened: list[Browser] = []

    def open_browser(name: str) -> Browser:
        browser = Browser(live_hub.url, output_dir(name))
        opened.append(browser)
        return browser

    yield open_browser
    for browser in opened:
        browser.close()
        print(f"\nscreenshots: {browser.shots}")


def test_a_cold_model_warms_with_a_live_bar_and_streams_its_answer(browser_for, node_worker, hf):
    get_user_model().objects.create_superuser("grace", "grace@example.com", PASSWORD)
    offered("gemma-play", display_name="Gemma 3 270M (test)", context_length=512)
    offered("coder-32b", display_name="Qwen2.5 Coder 32B", context_length=32768, vram_mb=29000,
            supports_tools=True, supports_json=True)
    hf.throttle_bytes_per_s = 30_000_000  # ~8 s for the 253 MB file: long enough to watch

    browser = browser_for("cold-model")
    page = browser.page
    browser.sign_in("grace")

    # The picker: the whole catalog, each with its state, context length and capabilities.
    page.wait_for_selector('.model-item[data-model-id="gemma-play"]')
    assert browser.badge("gemma-play") == "cold"
    coder = page.inner_text('.model-item[data-model-id="coder-32b"]')
    assert "32,768 tokens" in coder and "tools" in coder and "json" in coder
    browser.shot("1-picker")

    # Picking the cold model starts its load at once; the message waits for it.
    page.click('.model-item[data-model-id="gemma-play"]')
    page.fill("#max-tokens", "40")
    page.fill("#system-prompt", "You are a friendly poet.")
    page.fill("#prompt", "Write two lines about the sea.")
    page.click("#send")

    seen_pct: list[float] = []
    labels: list[str] = []
    phases: list[str] = []
    downloading_shot = loading_shot = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        bar = browser.bar()
        if not bar["hidden"]:
            if not phases or phases[-1] != bar["phase"]:
                phases.append(bar["phase"])
            if bar["phase"] == "downloading" and bar["pct"]:
                pct = float(bar["pct"])
                if not seen_pct or pct != seen_pct[-1]:
                    seen_pct.append(pct)
                    labels.append(bar["label"])
                if downloading_shot is None and 25 <= pct <= 75:
                    downloading_shot = browser.shot("2-downloading")
            if bar["phase"] == "loading" and loading_shot is None:
                loading_shot = browser.shot("3-loading")
        if page.inner_text(".message.assistant .body").strip() not in ("", "…"):
            break
        time.sleep(0.15)

    assert "downloading" in phases, phases
    assert len(seen_pct) >= 4, f"the bar moved: {seen_pct}"
    assert seen_pct == sorted(seen_pct) and seen_pct[-1] > seen_pct[0], seen_pct
    assert all(DOWNLOAD_LABEL.match(label) for label in labels if not label.startswith("Starting")), labels
    assert phases.index("downloading") < (phases.index("loading") if "loading" in phases else len(phases))
    assert downloading_shot is not None

    # The answer streams in; the bar is gone with the first token.
    page.wait_for_selector(".message.assistant.done", timeout=60_000)
    assert browser.bar()["hidden"]
    answer = page.inner_text(".message.assistant .body").strip()
    assert answer, "real generated text"
    chunks = int(page.get_attribute(".message.assistant", "data-chunks") or 0)
    assert chunks > 2, "tokens arrived as separate chunks"
    assert page.query_selector(".message .error") is None
    assert page.inner_text(".message.user .body") == "Write two lines about the sea."
    page.wait_for_function("() => document.querySelector('.model-item[data-model-id=\"gemma-play\"] .badge')"
                           ".textContent === 'ready'")
    browser.shot("4-answer")

    # The live state came over the websocket, not only from polling.
    frames = {url: n for url, n in browser.socket_frames.items() if url.endswith("/ws/warming/gemma-play/")}
    assert frames and max(frames.values()) >= 5, browser.socket_frames

    # A second message goes to the warm model: no bar at all, the conversation carries on.
    page.fill("#prompt", "And one more line.")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.message.assistant.done').length === 2", timeout=60_000)
    assert browser.bar()["hidden"]

    # Clear empties the history.
    page.click("#clear")
    assert page.query_selector_all(".message") == []
    assert not browser.console_errors, (browser.console_errors, browser.failed_responses)


def test_model_text_is_escaped_before_markdown_renders(browser_for, live_hub):
    get_user_model().objects.create_superuser("mallory", "m@example.com", PASSWORD)
    browser = browser_for("markdown")
    browser.sign_in("mallory")
    html = browser.page.evaluate("""() => window.PortenPlayground.renderMarkdown(
        '<img src=x onerror=alert(1)> **bold** and `<b>code</b>`\\n\\n```html\\n<script>alert(2)</script>\\n```\\n- one\\n- two')""")
    assert "<img" not in html and "<script" not in html and "<b>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<strong>bold</strong>" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert '<pre class="code" data-lang="html"><code>&lt;script&gt;alert(2)&lt;/script&gt;</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html


def test_errors_read_as_words_with_their_code_and_a_failed_load_offers_retry(browser_for, node_worker, hf):
    get_user_model().objects.create_superuser("linus", "l@example.com", PASSWORD)
    offered("coder-huge", display_name="Far too big", context_length=32768, vram_mb=90_000)
    offered("not-a-model", repo=BROKEN_REPO, display_name="Broken weights")
    browser = browser_for("errors")
    page = browser.page
    browser.sign_in("linus")
    page.wait_for_selector('.model-item[data-model-id="coder-huge"]')

    # No machine can ever hold it: said at once, in words, with the code.
    page.click('.model-item[data-model-id="coder-huge"]')
    page.wait_for_function("() => document.getElementById('warming').dataset.phase === 'error'")
    reason = page.inner_text("#warming-reason")
    assert "No machine in the fleet has room" in reason and "no_capacity" in reason, reason
    page.fill("#prompt", "Hello?")
    page.click("#send")
    page.wait_for_selector(".message .error", timeout=30_000)
    error = page.query_selector(".message .error")
    assert error.get_attribute("data-code") == "no_capacity"
    assert "HTTP 503" in error.inner_text()
    browser.shot("1-no-capacity")

    # A load that fails shows its reason and a retry button.
    page.click('.model-item[data-model-id="not-a-model"]')
    page.wait_for_function("() => document.getElementById('warming').dataset.phase === 'failed'", timeout=90_000)
    assert page.is_visible("#warming-retry")
    assert page.inner_text("#warming-reason").startswith("Loading not-a-model failed:")
    assert browser.badge("not-a-model") == "failed"
    browser.shot("2-load-failed")
    instance_of = "() => window.PortenPlayground.state.states.get('not-a-model').instance"
    failed_instance = page.evaluate(instance_of)
    page.click("#warming-retry")
    # Retry places a new load (it fails again, for the same reason). No ORM here: Playwright's sync
    # API keeps an event loop running in this thread, where Django refuses database calls.
    page.wait_for_function(f"() => ({instance_of})() !== {failed_instance}", timeout=10_000)
    page.wait_for_function("() => document.getElementById('warming').dataset.phase === 'failed'", timeout=90_000)
    assert page.evaluate(instance_of) != failed_instance


def test_without_the_websocket_the_bar_still_moves_by_polling_and_model_warming_is_retried(browser_for, node_worker, hf):
    get_user_model().objects.create_superuser("barbara", "b@example.com", PASSWORD)
    offered("gemma-poll", display_name="Gemma (no socket)", context_length=512)
    hf.throttle_bytes_per_s = 40_000_000
    browser = browser_for("polling")
    page = browser.page
    # Every warming socket is cut as soon as it opens: pushes are best effort.
    page.route_web_socket(re.compile(r".*/ws/warming/.*"), lambda ws: ws.close(code=1011, reason="gone"))
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if "/public/v1/models/warming" in r.url else None)
    # The first chat request gets what a gateway with a short budget answers: the page retries by itself.
    chat_calls: list[str] = []

    def budget_ran_out_once(route) -> None:
        chat_calls.append(route.request.headers.get("x-porten-warmup-budget", ""))
        if len(chat_calls) == 1:
            route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "application/json"}, body=(
                '{"error": {"message": "gemma-poll is warming up (downloading, 3.0%); retry in about 9 s.",'
                ' "type": "server_error", "code": "model_warming", "param": null}}'))
        else:
            route.continue_()

    page.route("**/v1/chat/completions", budget_ran_out_once)
    browser.sign_in("barbara")
    page.wait_for_selector('.model-item[data-model-id="gemma-poll"]')
    page.click('.model-item[data-model-id="gemma-poll"]')
    page.fill("#max-tokens", "16")
    page.fill("#prompt", "Hello there.")
    page.click("#send")

    seen_pct: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and page.query_selector(".message.assistant.done") is None:
        bar = browser.bar()
        if not bar["hidden"] and bar["phase"] == "downloading" and bar["pct"]:
            pct = float(bar["pct"])
            if not seen_pct or pct != seen_pct[-1]:
                seen_pct.append(pct)
                if len(seen_pct) == 3:
                    browser.shot("1-downloading-by-polling")
        time.sleep(0.15)
    assert len(seen_pct) >= 3, f"the bar kept moving without the socket: {seen_pct}"
    assert seen_pct == sorted(seen_pct), seen_pct
    assert any("model=gemma-poll" in url for url in polls)
    page.wait_for_selector(".message.assistant.done", timeout=60_000)
    assert page.inner_text(".message.assistant .body").strip()
    assert browser.bar()["hidden"]
    assert len(chat_calls) == 2 and set(chat_calls) == {"1800"}, chat_calls
    assert page.query_selector(".message .error") is None
