"""The chat page in a real browser (Debian's Chromium, driven by Playwright) against the real executable.

Every tab records each request the page makes; after each test all of them must have gone to the
executable's own address (the page loads nothing from anywhere else and sends nothing elsewhere).
Screenshots (desktop and phone width, light and dark) are written by test_screenshots into the
directory it prints, and copied to /tmp/chat-screenshots/.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Server, free_port, start_server, stop_server

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/setup.sh installs it as root)"),
]
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
LONG = "Write a very long story about a cat who travels around the world, with many chapters."
SCREENSHOTS = Path("/tmp/chat-screenshots")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@dataclass
class Tab:
    """A browser tab on the chat page, with everything it did."""

    page: Any
    url: str
    requests: list[Any] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def posts(self) -> list[Any]:
        return [r for r in self.requests if r.method == "POST" and r.url.endswith("/v1/chat/completions")]

    def until(self, expression: str, timeout: float = 120.0) -> Any:
        """Poll a JavaScript expression until it is truthy (Playwright's wait_for_function would need eval, which the page's CSP forbids)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.page.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {expression}")
            time.sleep(0.05)

    def generating(self) -> bool:
        return self.page.evaluate("document.getElementById('send').classList.contains('stop')")

    def wait_ready(self) -> None:
        self.page.wait_for_selector(f"#model:has-text('{MODEL_ID}')", timeout=60_000)

    def ask(self, text: str, timeout: float = 180.0) -> str:
        """Send a message with the keyboard and wait for the whole reply; its text as shown."""
        before = len(self.posts())
        self.page.fill("#input", text)
        self.page.keyboard.press("Enter")
        deadline = time.monotonic() + timeout
        while len(self.posts()) == before or self.generating():
            assert time.monotonic() < deadline, "no reply in time"
            self.page.wait_for_timeout(50)
        return self.page.locator(".msg.assistant .answer").last.inner_text()

    def stored(self) -> list[dict[str, Any]]:
        """The chats in the page's IndexedDB."""
        return self.page.evaluate(
            """() => new Promise((resolve, reject) => {
                const open = indexedDB.open("llamabox");
                open.onsuccess = () => {
                  const get = open.result.transaction("chats").objectStore("chats").getAll();
                  get.onsuccess = () => resolve(get.result);
                };
                open.onerror = () => reject(open.error);
            })"""
        )

    def import_chat(self, chat: dict[str, Any], name: str = "chat.json") -> None:
        # The page lists the chat before it opens it, and says "Imported" once it has: wait for that word.
        self.page.evaluate("document.getElementById('toast').textContent = ''")
        self.page.set_input_files("#import-file", files=[{"name": name, "mimeType": "application/json", "buffer": json.dumps(chat).encode()}])
        self.until("document.getElementById('toast').textContent.startsWith('Imported')", 10)

    def set_settings(self, **settings: Any) -> None:
        self.page.evaluate(f"localStorage.setItem('llamabox-settings:{MODEL_ID}', {json.dumps(json.dumps(settings))})")


def open_tab(browser: Any, url: str, width: int = 1280, height: int = 860, scheme: str = "light") -> Tab:
    context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=scheme, accept_downloads=True)
    page = context.new_page()
    tab = Tab(page, url)
    context.on("request", lambda request: tab.requests.append(request))
    page.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.goto(url)
    return tab


def close_tab(tab: Tab) -> None:
    tab.page.context.close()
    foreign = [r.url for r in tab.requests if not r.url.startswith((tab.url, "data:", "blob:"))]
    assert not foreign, f"the page made requests elsewhere: {foreign}"
    assert not tab.errors, f"uncaught errors in the page: {tab.errors}"
    assert not tab.dialogs, f"the page opened browser dialogs: {tab.dialogs}"


@pytest.fixture
def tab(browser: Any, server: Server) -> Iterator[Tab]:
    opened = open_tab(browser, server.url)
    yield opened
    close_tab(opened)


def greedy(server: Server, messages: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
    """The server's own answer, without the page (the server runs with --temp 0)."""
    response = httpx.post(server.url + "v1/chat/completions", json={"messages": messages, **fields}, timeout=300)
    response.raise_for_status()
    return response.json()


def busy_slots(url: str, headers: dict[str, str] | None = None) -> int:
    return sum(slot["is_processing"] for slot in httpx.get(url + "slots", headers=headers, timeout=10).json())


# --- streaming, stopping, the model's facts -----------------------------------------------------------------


def test_reply_streams_in_with_its_numbers_and_stop_frees_the_slot(tab: Tab, server: Server) -> None:
    page = tab.page
    tab.wait_ready()
    facts = page.inner_text("#model-facts")
    assert "135M parameters" in facts and "MB" in facts and "apache-2.0" in facts and "CPU kernels:" in facts
    # Settings through the dialog, persisted per model.
    page.click("#open-settings")
    assert page.input_value("#set-temperature") == "0"  # the bundle's default (the server runs with --temp 0)
    assert "Context" in page.inner_text("#about") and "4,096 tokens" in page.inner_text("#about")
    page.fill("#set-max-tokens", "32")
    page.click("#settings button[value=save]")
    assert json.loads(page.evaluate(f"localStorage.getItem('llamabox-settings:{MODEL_ID}')"))["max_tokens"] == 32

    question = "Write one sentence about cats."
    page.fill("#input", question)
    page.keyboard.press("Enter")
    tab.until("document.getElementById('send').classList.contains('stop')", 30)
    lengths = set()
    while tab.generating():
        lengths.add(len(page.evaluate("document.querySelector('.msg.assistant .answer')?.textContent || ''")))
        page.wait_for_timeout(20)
    assert len(lengths - {0}) >= 2, f"the reply did not arrive in pieces: {lengths}"

    expected = greedy(server, [{"role": "user", "content": question}], max_tokens=32)
    reply = tab.stored()[0]["messages"][1]
    assert reply["content"] == expected["choices"][0]["message"]["content"]
    usage = expected["usage"]
    assert reply["stats"]["completion_tokens"] == usage["completion_tokens"]
    stats = page.inner_text(".msg.assistant .stats")
    assert f"{usage['completion_tokens']} tokens" in stats and "tokens/s" in stats and f"prompt {usage['prompt_tokens']}" in stats
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    assert page.inner_text("#context-text") == f"{used} / 4,096 tokens of context"

    # Back to the bundle's defaults (no token limit), then stop a long reply with Esc.
    page.click("#open-settings")
    page.click("#reset-settings")
    assert page.input_value("#set-max-tokens") == ""
    page.keyboard.press("Escape")
    page.fill("#input", LONG)
    page.keyboard.press("Enter")
    tab.until("(document.querySelectorAll('.msg.assistant .answer')[1]?.textContent || '').length > 30", 120)
    assert busy_slots(server.url) == 1
    page.keyboard.press("Escape")
    tab.until("!document.getElementById('send').classList.contains('stop')", 10)
    deadline = time.monotonic() + 5
    while busy_slots(server.url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_slots(server.url) == 0, "the generation went on after Stop"
    assert "stopped" in page.locator(".msg.assistant .stats").last.inner_text()
    stopped = tab.stored()[0]["messages"][3]
    assert stopped["stats"]["finish_reason"] == "stopped" and len(stopped["content"]) > 30


# --- history: reload, edit, regenerate -----------------------------------------------------------------------


def test_reload_finds_the_chat_and_edit_and_regenerate_resend(tab: Tab, server: Server) -> None:
    page = tab.page
    tab.wait_ready()
    tab.set_settings(max_tokens=24)
    page.reload()
    tab.wait_ready()
    first = tab.ask("What is 2+2?")
    second = tab.ask("And what is 3+3?")
    assert first and second
    page.reload()
    tab.wait_ready()
    assert page.locator("article.msg").count() == 4
    assert page.locator(".msg.assistant .answer").first.inner_text() == first
    assert page.inner_text(".chat-item.current") == "What is 2+2?"
    assert page.title() == "What is 2+2? · llamabox"

    # Edit the first question: what followed it goes, a new answer comes.
    posts = len(tab.posts())
    page.locator("article.msg.user").first.locator("[data-action=edit]").click()
    page.fill("article.msg.user textarea", "What is 5+5?")
    page.keyboard.press("Enter")
    deadline = time.monotonic() + 180
    while len(tab.posts()) == posts or tab.generating():
        assert time.monotonic() < deadline
        page.wait_for_timeout(50)
    assert json.loads(tab.posts()[-1].post_data)["messages"] == [{"role": "user", "content": "What is 5+5?"}]
    expected = greedy(server, [{"role": "user", "content": "What is 5+5?"}], max_tokens=24)["choices"][0]["message"]["content"]
    chat = tab.stored()[0]
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert chat["messages"][0]["content"] == "What is 5+5?" and chat["messages"][1]["content"] == expected

    # Regenerate: the same request again, and (greedy) the same answer replaces the old one.
    posts = len(tab.posts())
    page.click("[data-action=regenerate]")
    deadline = time.monotonic() + 180
    while len(tab.posts()) == posts or tab.generating():
        assert time.monotonic() < deadline
        page.wait_for_timeout(50)
    assert json.loads(tab.posts()[-1].post_data)["messages"] == [{"role": "user", "content": "What is 5+5?"}]
    chat = tab.stored()[0]
    assert len(chat["messages"]) == 2 and chat["messages"][1]["content"] == expected
    assert page.locator("article.msg").count() == 2


# --- sanitizing --------------------------------------------------------------------------------------------

ATTACKS = [
    "<script>window.__pwned = 'script'</script>",
    "<img src=x onerror=\"window.__pwned = 'img onerror'\">",
    "<iframe src=\"javascript:window.__pwned = 'iframe'\"></iframe>",
    "<iframe srcdoc=\"<script>parent.__pwned = 'srcdoc'</script>\"></iframe>",
    "[a markdown link](javascript:window.__pwned='markdown link')",
    "<a href=\"javascript:window.__pwned = 'a href'\">an html link</a>",
    "<a href=\"JaVaScRiPt&colon;window.__pwned = 'encoded'\">an encoded link</a>",
    "<svg onload=\"window.__pwned = 'svg'\"><circle r=4 /></svg>",
    "<details open ontoggle=\"window.__pwned = 'ontoggle'\"><summary>x</summary></details>",
    "<math><mtext><table><mglyph><style><img src=x onerror=\"window.__pwned = 'mxss'\"></style></mglyph></table></mtext></math>",
    "<form action=\"javascript:window.__pwned='form'\"><button>submit</button></form>",
    "<object data=\"javascript:window.__pwned='object'\"></object><embed src=\"javascript:window.__pwned='embed'\">",
    "<div style=\"background:url(http://example.com/styled.png)\">styled</div>",
    "![a tracker](http://example.com/tracker.png) and ![local](/x.png)",
    "Math that tries a link: $\\href{javascript:window.__pwned='katex'}{click}$",
    "<input autofocus onfocus=\"window.__pwned = 'autofocus'\">",
]


def attack_chat() -> dict[str, Any]:
    content = "\n\n".join(ATTACKS)
    return {
        "title": "Markup attacks",
        "messages": [
            {"role": "user", "content": "<img src=x onerror=\"window.__pwned = 'user text'\"> please"},
            {"role": "assistant", "content": f"<think>{ATTACKS[1]}</think>\n\n{content}\n\nEnd of attacks."},
        ],
    }


def assert_inert(tab: Tab) -> None:
    page = tab.page
    assert page.evaluate("window.__pwned") is None
    found = page.evaluate(
        """() => ({
            handlers: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.toLowerCase().startsWith('on')))
                        .map(e => e.outerHTML.slice(0, 120)),
            active: [...document.querySelectorAll('#thread script, #thread iframe, #thread object, #thread embed, #thread form, #thread input, #thread style, #thread img')]
                        .map(e => e.outerHTML.slice(0, 120)),
            scriptLinks: [...document.querySelectorAll('a[href]')].filter(a => !/^(https?:|blob:|#)/.test(a.getAttribute('href')) && a.protocol !== 'http:')
                        .map(a => a.outerHTML.slice(0, 120)),
            styled: [...document.querySelectorAll('#thread .answer [style]')].filter(e => !e.closest('.katex')).map(e => e.outerHTML.slice(0, 120)),
        })"""
    )
    assert found == {"handlers": [], "active": [], "scriptLinks": [], "styled": []}
    # marked leaves a javascript: link in Markdown as text; clicking what were HTML ones does nothing.
    assert "[a markdown link](javascript:" in page.inner_text(".msg.assistant .answer")
    for text in ["an html link", "an encoded link"]:
        page.get_by_text(text, exact=True).click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    assert not [r.url for r in tab.requests if "example.com" in r.url or r.url.endswith("/x") or r.url.endswith("/x.png")]


def test_markup_in_a_stored_reply_runs_nothing_and_loads_nothing(tab: Tab) -> None:
    page = tab.page
    tab.wait_ready()
    tab.import_chat(attack_chat())
    page.wait_for_selector("text=End of attacks.")
    assert_inert(tab)
    # Rendered again from the browser's storage after a reload.
    page.reload()
    tab.wait_ready()
    page.wait_for_selector("text=End of attacks.")
    assert_inert(tab)
    assert "please" in page.inner_text(".msg.user .bubble") and "<img" in page.inner_text(".msg.user .bubble")  # user text stays text
    assert page.locator(".msg.assistant details.reasoning:not([open])").count() == 1
    assert "[image: a tracker]" in page.inner_text(".msg.assistant .answer")
    assert page.locator(".msg.assistant .answer .katex").count() >= 1


# --- the list of chats, export and import -----------------------------------------------------------------


def test_chats_are_listed_searched_renamed_exported_imported_and_deleted(tab: Tab, tmp_path: Path) -> None:
    page = tab.page
    tab.wait_ready()
    tab.import_chat({"title": "Alpha trip", "messages": [{"role": "user", "content": "Plan a trip"}, {"role": "assistant", "content": "Go **north**."}]})
    tab.import_chat(
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Beta notes please"},
                      {"role": "assistant", "content": "<think>They want notes.</think>Here are the notes:\n\n- one\n- two\n\n```js\nconsole.log(1 < 2);\n```"}]},
        name="beta.json",
    )
    assert page.inner_text(".chat-item.current") == "Beta notes please"
    assert "Be terse." in page.inner_text(".system-note")
    assert page.locator("details.reasoning:not([open])").count() == 1
    assert "They want notes" not in page.inner_text(".msg.assistant .answer")

    # Copy a code block, and a whole answer (as its Markdown, without the reasoning).
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click(".copy-code")
    page.wait_for_selector("#toast:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == "console.log(1 < 2);\n"
    assert page.inner_text(".code-head span") == "js" and page.locator(".code-block code [class^=hljs-]").count() > 0
    page.locator(".msg.assistant [data-action=copy]").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("Here are the notes:")

    page.fill("#search", "alpha")
    assert page.locator(".chat-item").all_inner_texts() == ["Alpha trip"]
    page.fill("#search", "")
    page.locator(".chat-item.current [data-action=rename]").click()
    page.fill("#ask-input", "Gamma notes")
    page.keyboard.press("Enter")
    tab.until("document.querySelector('.chat-item.current')?.textContent === 'Gamma notes'", 10)

    with page.expect_download() as download:
        page.click("#export-json")
    exported = json.loads(Path(download.value.path()).read_text())
    assert download.value.suggested_filename == "Gamma-notes.json"
    assert exported["format"] == "llamabox-chat" and exported["title"] == "Gamma notes"
    assert [m["role"] for m in exported["messages"]] == ["system", "user", "assistant"]
    with page.expect_download() as download:
        page.click("#export-md")
    markdown = Path(download.value.path()).read_text()
    assert markdown.startswith("# Gamma notes") and "## User\n\nBeta notes please" in markdown and "<summary>Reasoning</summary>" in markdown

    tab.import_chat(exported, name="again.json")  # what was exported comes back
    assert page.locator(".chat-item").all_inner_texts() == ["Gamma notes", "Gamma notes", "Alpha trip"]

    page.locator(".chat-item.current [data-action=delete]").click()
    page.click("#ask-ok")
    tab.until("document.querySelectorAll('.chat-item').length === 2", 10)
    assert sorted(c["title"] for c in tab.stored()) == ["Alpha trip", "Gamma notes"]

    page.set_input_files("#import-file", files=[{"name": "bad.json", "mimeType": "application/json", "buffer": b"{\"messages\": 3}"}])
    page.wait_for_selector("#toast:has-text('Cannot import bad.json')")


# --- files, keyboard, scripts ------------------------------------------------------------------------------


def test_attached_file_goes_into_the_prompt_and_keyboard_works(tab: Tab) -> None:
    page = tab.page
    tab.wait_ready()
    tab.set_settings(max_tokens=8)
    page.reload()
    tab.wait_ready()
    page.set_input_files("#attach-file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": "The secret word is PINEAPPLE.\n".encode()}])
    page.wait_for_selector("#attachments .file-chip:has-text('notes.txt')")
    page.set_input_files("#attach-file", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n\x00\x00\x00"}])
    page.wait_for_selector("#toast:has-text('photo.png is not a text file')")
    page.focus("#input")
    page.keyboard.type("What is the secret word?")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("Answer in one word.")
    assert page.input_value("#input") == "What is the secret word?\nAnswer in one word."
    page.keyboard.press("Enter")
    tab.until("document.querySelectorAll('.msg.assistant').length === 1", 30)
    tab.until("!document.getElementById('send').classList.contains('stop')", 180)
    sent = json.loads(tab.posts()[-1].post_data)["messages"][-1]["content"]
    assert "notes.txt" in sent and "The secret word is PINEAPPLE." in sent and sent.endswith("What is the secret word?\nAnswer in one word.")
    assert page.inner_text(".msg.user .files") == "notes.txt"
    # Every control has a name a screen reader can say.
    unnamed = page.evaluate(
        "[...document.querySelectorAll('button, input, textarea')].filter(e => !e.hidden && e.type !== 'file' "
        "&& !(e.getAttribute('aria-label') || e.getAttribute('aria-labelledby') || e.textContent.trim() || e.labels?.length || e.placeholder)).map(e => e.outerHTML.slice(0, 80))"
    )
    assert unnamed == []
    page.keyboard.press("Control+Shift+O")
    tab.until("document.querySelectorAll('article.msg').length === 0", 10)


def test_right_to_left_cjk_and_emoji_render_as_written(tab: Tab) -> None:
    page = tab.page
    tab.wait_ready()
    arabic, cjk, emoji = "مرحبا بالعالم، هذا نص عربي.", "日本語：こんにちは世界。中文：你好，世界。", "👩🏽‍💻 🇯🇵 ❤️"
    tab.import_chat({"title": "多言語 chat", "messages": [{"role": "user", "content": arabic},
                                                            {"role": "assistant", "content": f"English first.\n\n{arabic}\n\n{cjk} {emoji}"}]})
    paragraphs = page.evaluate("[...document.querySelectorAll('.msg.assistant .answer p')].map(p => [p.textContent, getComputedStyle(p).direction])")
    assert paragraphs == [["English first.", "ltr"], [arabic, "rtl"], [f"{cjk} {emoji}", "ltr"]]
    assert page.evaluate("getComputedStyle(document.querySelector('.msg.user .bubble')).direction") == "rtl"
    assert page.inner_text(".chat-item.current") == "多言語 chat"


def test_the_page_and_its_vendored_files_are_all_served_by_the_executable(tab: Tab, server: Server) -> None:
    tab.wait_ready()
    loaded = {r.url.removeprefix(server.url) for r in tab.requests}
    for asset in ["ui/app.js", "ui/api.js", "ui/store.js", "ui/render.js", "ui/app.css", "ui/vendor/marked/marked.umd.js",
                  "ui/vendor/dompurify/purify.min.js", "ui/vendor/highlight.js/highlight.min.js", "ui/vendor/katex/katex.min.js"]:
        assert asset in loaded
    for folder in ["marked", "dompurify", "highlight.js", "katex"]:
        assert (ROOT / "templates" / "vendor" / folder / "LICENSE").is_file()
        assert httpx.get(server.url + f"ui/vendor/{folder}/LICENSE").status_code == 200
    csp = tab.page.evaluate("document.querySelector('meta[http-equiv=Content-Security-Policy]').content")
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "script-src 'self';" in csp


# --- the API key, and errors ----------------------------------------------------------------------------------


def test_api_key_is_asked_once_kept_for_the_tab_and_asked_again_when_refused(browser: Any, bundle: Path) -> None:
    pirate = "You are a pirate. Answer like one."
    server = start_server(bundle, "--api-key", "s3cret-key", "--temp", "0", "--system-prompt", pirate, "--port", str(free_port()))
    try:
        tab = open_tab(browser, server.url)
        page = tab.page
        page.wait_for_selector("#ask[open] >> text=This server wants its API key")
        page.fill("#ask-input", "wrong")
        page.keyboard.press("Enter")
        page.wait_for_selector("#ask[open] >> text=That API key was refused")
        page.fill("#ask-input", "s3cret-key")
        page.click("#ask-ok")
        tab.wait_ready()
        assert page.evaluate("sessionStorage.getItem('llamabox-api-key')") == "s3cret-key"
        tab.set_settings(max_tokens=8)
        page.reload()
        tab.wait_ready()
        assert page.locator("#ask[open]").count() == 0  # kept for the session: not asked again
        page.click("#open-settings")
        assert page.input_value("#set-system") == pirate  # the bundle's own system prompt, to start from
        page.keyboard.press("Escape")
        assert tab.ask("Hi")
        assert tab.posts()[-1].all_headers()["authorization"] == "Bearer s3cret-key"
        close_tab(tab)

        # Dismissed: a readable error with a retry, which asks again.
        tab = open_tab(browser, server.url)
        page = tab.page
        page.wait_for_selector("#ask[open]")
        page.click("#ask-cancel")
        page.wait_for_selector(".error-box >> text=This server wants an API key")
        page.click(".error-box [data-action=retry]")
        page.wait_for_selector("#ask[open]")
        page.fill("#ask-input", "s3cret-key")
        page.keyboard.press("Enter")
        tab.wait_ready()
        assert page.locator(".error-box").count() == 0
        close_tab(tab)
    finally:
        stop_server(server)


def test_busy_too_long_and_gone_are_readable_errors_with_a_retry(browser: Any, bundle: Path) -> None:
    port = free_port()
    args = ("--temp", "0", "-np", "1", "--queue", "0", "-c", "256", "--port", str(port))
    server = start_server(bundle, *args)
    first = second = None
    try:
        first = open_tab(browser, server.url)
        first.wait_ready()
        second = open_tab(browser, server.url)
        second.wait_ready()
        second.set_settings(max_tokens=8)
        # A message longer than the context.
        first.page.fill("#input", "Tell me about this: " + "many words here " * 100)
        first.page.keyboard.press("Enter")
        first.page.wait_for_selector(".error-box >> text=no longer fits in the model's context")
        assert "Context full" in first.page.inner_text("#context-text")
        first.page.click(".error-box [data-action=new-chat]")

        # The only slot is busy and nobody may wait: the second tab is told, and retries later.
        first.page.fill("#input", LONG)
        first.page.keyboard.press("Enter")
        first.until("(document.querySelector('.msg.assistant .answer')?.textContent || '').length > 10", 120)
        second.page.fill("#input", "Hi")
        second.page.keyboard.press("Enter")
        second.page.wait_for_selector(".error-box >> text=The server is busy")
        first.page.keyboard.press("Escape")
        first.until("!document.getElementById('send').classList.contains('stop')", 10)
        # The server frees the slot at its next step after it sees the tab's connection close: retry only then
        # (earlier, the retry is rightly told "busy" again).
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "health").json()["slots_idle"] != 1:
            assert time.monotonic() < deadline, "the stopped reply's slot was never freed"
            time.sleep(0.05)
        second.page.click(".error-box [data-action=retry]")
        second.until("document.querySelector('.msg.assistant .stats')", 180)
        assert second.page.locator(".error-box").count() == 0

        # The server goes away: the page says so; once it is back, Retry answers.
        stop_server(server)
        second.page.fill("#input", "Hello again")
        second.page.keyboard.press("Enter")
        second.page.wait_for_selector(".error-box >> text=Cannot reach the llamabox server")
        assert second.page.locator(".msg.user").count() == 2  # the question is kept for the retry
        server = start_server(bundle, *args)
        second.page.click(".error-box [data-action=retry]")
        second.until("document.querySelectorAll('.msg.assistant .stats').length === 2", 180)
    finally:
        for opened in (first, second):
            if opened is not None:
                close_tab(opened)
        stop_server(server)


# --- screenshots -----------------------------------------------------------------------------------------------

SHOWCASE = {
    "title": "Markdown, code and math",
    "messages": [
        {"role": "user", "content": "Show me what you can render: a table, code, math, and a few languages."},
        {"role": "assistant", "content": (
            "<think>The user wants a sample of everything the page renders. A heading, a list, a table, "
            "a code block and some math.</think>\n\n"
            "## A little of everything\n\n"
            "Markdown with **bold**, *italic* and `inline code`:\n\n"
            "1. a numbered list\n2. with two items\n\n"
            "| Language | Hello |\n|---|---|\n| Japanese | こんにちは |\n| Chinese | 你好 |\n| Arabic | مرحبا |\n\n"
            "```python\ndef greet(name: str) -> str:\n    \"\"\"Say hello.\"\"\"\n    return f\"Hello, {name}! 👋\"\n```\n\n"
            "Euler's identity $e^{i\\pi} + 1 = 0$, and a display formula:\n\n"
            "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$\n\n"
            "مرحبا بالعالم، هذا نص عربي يُقرأ من اليمين إلى اليسار.\n\n"
            "日本語と中文も大丈夫です。🎉"
        ), "stats": {"prompt_tokens": 41, "completion_tokens": 187, "predicted_per_second": 61.4, "finish_reason": "stop"}},
    ],
}


def test_screenshots(browser: Any, server: Server, tmp_path: Path) -> None:
    out = tmp_path / "screenshots"
    out.mkdir()
    for scheme in ("light", "dark"):
        tab = open_tab(browser, server.url, scheme=scheme)
        page = tab.page
        tab.wait_ready()
        tab.set_settings(max_tokens=40)
        tab.import_chat(SHOWCASE)
        tab.import_chat({"title": "Travel ideas", "messages": [{"role": "user", "content": "Ideas for a weekend trip?"}]})
        page.locator(".chat-item", has_text="Markdown, code and math").locator("[data-action=open]").click()
        page.wait_for_selector(".katex")
        tab.ask("What is the capital of France?")
        page.mouse.move(0, 0)
        page.screenshot(path=str(out / f"desktop-{scheme}-reply.png"))
        page.evaluate("document.getElementById('messages').scrollTop = 0")
        page.screenshot(path=str(out / f"desktop-{scheme}.png"))
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(400)  # the list of chats slides away
        page.evaluate("document.getElementById('messages').scrollTop = 0")
        page.screenshot(path=str(out / f"phone-{scheme}.png"))
        page.click("#open-sidebar")
        page.wait_for_timeout(300)
        page.screenshot(path=str(out / f"phone-{scheme}-chats.png"))
        page.keyboard.press("Escape")
        if scheme == "light":
            page.set_viewport_size({"width": 1280, "height": 860})
            page.click("#open-settings")
            page.screenshot(path=str(out / "desktop-light-settings.png"))
            page.keyboard.press("Escape")
        close_tab(tab)
    SCREENSHOTS.mkdir(exist_ok=True)
    for shot in out.iterdir():
        shutil.copy(shot, SCREENSHOTS / shot.name)
    print(f"screenshots: {out} (copied to {SCREENSHOTS})")
    assert {p.name for p in out.iterdir()} >= {"desktop-light.png", "desktop-dark.png", "phone-light.png", "phone-dark.png"}
