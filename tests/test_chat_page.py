"""The chat page in a real browser (Debian's Chromium, driven by Playwright) against the real executable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import Server

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh installs it as root)"),
]


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser.new_page()
        browser.close()


def test_chat_in_the_browser(page, server: Server, tmp_path: Path) -> None:
    page.goto(server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')")
    page.fill("#input", "Write one sentence about cats.")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.user")
    # The answer streams in; the button reads "Stop" until it is complete.
    page.wait_for_function("document.getElementById('send').textContent === 'Send'", timeout=60_000)
    answer = page.inner_text(".msg.assistant")
    assert "cat" in answer.lower()
    page.screenshot(path=str(tmp_path / "chat.png"))
    # A second turn sends the history along and gets a second answer.
    page.fill("#input", "And one about dogs.")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                           "document.getElementById('send').textContent === 'Send'", timeout=60_000)
    assert page.locator(".msg.assistant").nth(1).inner_text().strip()
