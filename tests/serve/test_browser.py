"""The chat page (mmgpt/serve/static) in a real browser: headless Chromium drives it against a live server.

Needs the ``playwright`` Python package and a Chromium at /usr/bin/chromium (Debian's ``apt-get install chromium``;
``playwright install`` is never needed). Without them the tests skip, unless MMGPT_REQUIRE_BROWSER=1 makes that a
failure (CI sets it once it has installed Chromium). MMGPT_SCREENSHOT=<path> saves the page after its first answer.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from PIL import Image

import mmgpt

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "assets" / "examples" / "0.png"
CHROMIUM = Path("/usr/bin/chromium")
# Chromium's background services (component updates, sync, field trials, QUIC probes) reach for the internet; on a
# closed network they fail and log errors that are not the page's.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
MODEL_NAME = "mmgpt-shapes"
# The shapes model's caption prompt: its answer is a sentence, many tokens, so streaming shows in several pieces
# (a one-word answer such as a color comes in one).
FIRST = "Describe the image."
SECOND = "What color is the circle?"
# Records every text the last assistant bubble shows, as it changes: proof that the answer was drawn piece by piece.
RECORD_REPLIES = """
window.__replies = [];
new MutationObserver(() => {
  const texts = document.querySelectorAll("#log .msg.assistant .text");
  if (texts.length) window.__replies.push(texts[texts.length - 1].textContent);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""
# Drops a PNG (base64) on the conversation as a file dragged from the desktop would be.
DROP_FILE = """
([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type: "image/png" }));
  const target = document.getElementById("log");
  target.dispatchEvent(new DragEvent("dragenter", { dataTransfer: transfer, bubbles: true }));
  const overlayShown = !document.getElementById("drop-overlay").hidden;
  target.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  return overlayShown;
}
"""


def _missing_browser() -> str | None:
    if sync_playwright is None:
        return "the playwright Python package is not installed (pip install playwright)"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def server():
    """``create_app(mmgpt.load())`` served by uvicorn from a background thread on a free 127.0.0.1 port."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from mmgpt.serve.app import create_app

    pipeline = mmgpt.load()
    # Bound here, port 0: the OS picks a free port and no other process can take it before uvicorn listens.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(pipeline, model_name=MODEL_NAME), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", pipeline=pipeline)
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    reason = _missing_browser()
    if reason is not None:
        if os.environ.get("MMGPT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MMGPT_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def chat(browser, server):
    """A fresh page on the chat, with the requests it made and the errors it logged."""
    context = browser.new_context(viewport={"width": 900, "height": 700})
    page = context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script(RECORD_REPLIES)
    page.goto(server.url)
    # The model's name comes from GET /v1/models: once shown, the page's script has run and talked to the server.
    page.wait_for_function(f"document.getElementById('model').textContent === {json.dumps(MODEL_NAME)}")
    yield SimpleNamespace(page=page, requests=requests, errors=errors, pipeline=server.pipeline)
    context.close()


def _outside(urls: list[str]) -> list[str]:
    """The requests to anywhere but the test server (data: URLs stay in the page)."""
    return [u for u in urls if urlparse(u).scheme != "data" and urlparse(u).hostname != "127.0.0.1"]


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _answer(page, n: int) -> str:
    """Waits until the page shows its n-th answer in full, and returns it."""
    page.wait_for_function(
        f"document.querySelectorAll('#log .msg.assistant').length === {n} && !document.querySelector('#log .pending')"
    )
    return page.locator("#log .msg.assistant .text").nth(n - 1).text_content()


def _streamed_pieces(sse: str) -> list[str]:
    """The non-empty ``delta.content`` of each chunk of a chat-completions event stream."""
    pieces = []
    for line in sse.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            pieces.append(json.loads(line[5:])["choices"][0]["delta"].get("content") or "")
    return [p for p in pieces if p]


def test_page_loads_from_the_server_alone_without_errors(chat):
    assert chat.errors == []
    assert _outside(chat.requests) == []
    paths = {urlparse(u).path for u in chat.requests}
    assert {"/", "/v1/models"} <= paths
    assert chat.page.locator("#temperature").input_value() == "0"


def test_page_fits_a_phone_screen(chat):
    chat.page.set_viewport_size({"width": 360, "height": 740})
    overflow = chat.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    assert chat.page.locator("#send").is_visible() and chat.page.locator("#prompt").is_visible()


def test_answers_stream_in_and_the_conversation_is_kept(chat):
    page, pipeline = chat.page, chat.pipeline
    image = Image.open(EXAMPLE)
    page.set_input_files("#file", str(EXAMPLE))
    page.wait_for_selector("#thumb", state="visible")
    assert page.get_attribute("#thumb", "src") == _data_url(EXAMPLE)

    # First turn, sent with Enter from the message box.
    page.fill("#prompt", FIRST)
    with page.expect_response("**/v1/chat/completions") as response:
        page.press("#prompt", "Enter")
    first = _answer(page, 1)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": FIRST}]}]
    assert first == pipeline.chat(turn1)  # greedy: temperature 0 is the page's default
    pieces = _streamed_pieces(response.value.text())
    assert len(pieces) > 1 and "".join(pieces) == first
    # The page drew the answer as it came: it showed texts that were only the start of it.
    shown = [t for t in page.evaluate("window.__replies") if t]
    assert any(t != first for t in shown) and all(first.startswith(t) for t in shown)
    assert page.locator("#thumb").is_hidden()  # the image went with the message
    if os.environ.get("MMGPT_SCREENSHOT"):
        Path(os.environ["MMGPT_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=os.environ["MMGPT_SCREENSHOT"])

    # Second turn, with the Send button and no new image: the request carries the whole conversation.
    page.fill("#prompt", SECOND)
    with page.expect_request("**/v1/chat/completions") as request:
        page.click("#send")
    body = request.value.post_data_json
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(EXAMPLE)}}, {"type": "text", "text": FIRST},
        ]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "text", "text": SECOND}]},
    ]
    assert body["stream"] is True and body["temperature"] == 0 and body["model"] == MODEL_NAME
    turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": SECOND}]
    assert _answer(page, 2) == pipeline.chat(turn2)
    assert chat.errors == []
    assert _outside(chat.requests) == []

    # New chat forgets it all. What the user writes is shown as text, never read as HTML.
    page.click("#new-chat")
    assert page.locator("#log .msg").count() == 0
    question = "Is there a <b>circle</b>?"
    page.fill("#prompt", question)
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    sent = request.value.post_data_json["messages"]
    assert sent == [{"role": "user", "content": [{"type": "text", "text": question}]}]
    _answer(page, 1)
    assert page.locator("#log .msg.user .text").text_content() == question
    assert page.locator("#log b").count() == 0


def test_server_error_is_shown_and_the_turn_can_be_retried(chat):
    page = chat.page
    # Declared a PNG (so the page sends it), but not one: the server refuses it with a 400 and its error JSON.
    page.set_input_files("#file", {"name": "broken.png", "mimeType": "image/png", "buffer": b"not a png"})
    page.fill("#prompt", FIRST)
    with page.expect_response("**/v1/chat/completions") as response:
        page.press("#prompt", "Enter")
    assert response.value.status == 400
    message = response.value.json()["error"]["message"]
    page.wait_for_selector("#error", state="visible")
    assert message and message in page.text_content("#error")
    # The failed turn leaves the conversation and returns to the composer.
    assert page.locator("#log .msg").count() == 0
    assert page.input_value("#prompt") == FIRST
    assert page.locator("#thumb").is_visible()


def test_dropped_image_is_attached(chat):
    page = chat.page
    b64 = base64.b64encode(EXAMPLE.read_bytes()).decode()
    overlay_shown = page.evaluate(DROP_FILE, ["0.png", b64])
    assert overlay_shown
    page.wait_for_selector("#thumb", state="visible")
    assert page.get_attribute("#thumb", "src") == _data_url(EXAMPLE)
    assert page.locator("#drop-overlay").is_hidden()
    assert chat.errors == []
