"""Bad requests to ``mmgpt serve``: each is a 4xx with OpenAI's error JSON naming the field at fault, never a 500 or
a dropped connection, and the server goes on answering."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from live_server import EXAMPLES, MODEL_NAME, data_url, expected, running, text_message
from PIL import Image

pytest.importorskip("fastapi")

MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def server():
    with running(max_request_bytes=MAX_BYTES) as s:
        yield s


def _image_part(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def _png(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")  # one colour: a few KB whatever the size
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _eps() -> bytes:
    """A picture as Encapsulated PostScript: a program PIL would hand to Ghostscript to draw."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="EPS")
    return buffer.getvalue()


def _truncated() -> str:
    head, payload = data_url().split(",")
    return f"{head},{payload[: len(payload) // 8 * 4]}"  # the first half, still valid base64


HI = text_message("hi")
IMAGE = "messages[0].content[1].image_url"
# (what is wrong, request fields, the param the error must name)
BAD = [
    ("bad base64", dict(messages=_image_part("data:image/png;base64,iVBORw0K$$$notbase64")), IMAGE),
    ("text file as image", dict(messages=_image_part(
        "data:image/png;base64," + base64.b64encode((EXAMPLES / "examples.json").read_bytes()).decode())), IMAGE),
    ("truncated image", dict(messages=_image_part(_truncated())), IMAGE),
    ("PostScript image", dict(messages=_image_part("data:image/eps;base64," + base64.b64encode(_eps()).decode())),
     IMAGE),
    ("not an image media type", dict(messages=_image_part("data:text/plain;base64,aGVsbG8=")), IMAGE),
    ("data URL not base64", dict(messages=_image_part("data:image/png,rawbytes")), IMAGE),
    ("image bomb", dict(messages=_image_part(_png((5000, 5000)))), IMAGE),
    ("http URL", dict(messages=_image_part("https://example.com/cat.png")), IMAGE),
    ("local path without the flag", dict(messages=_image_part(str(EXAMPLES / "0.png"))), IMAGE),
    ("file URL without the flag", dict(messages=_image_part((EXAMPLES / "0.png").as_uri())), IMAGE),
    ("other URL scheme", dict(messages=_image_part("ftp://example.com/cat.png")), IMAGE),
    ("image_url not an object", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}]), "messages[0].content[0].image_url"),
    ("image in an assistant turn", dict(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url()}}]},
        {"role": "user", "content": "again"}]), "messages[1].content[0]"),
    ("prompt too long", dict(messages=text_message("circle square " * 200)), "messages"),
    ("too many images", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url()}}] * 20}]), "messages"),
    ("max_tokens past the context", dict(messages=HI, max_tokens=1000), "max_tokens"),
    ("max_completion_tokens past the context", dict(messages=HI, max_completion_tokens=1000),
     "max_completion_tokens"),
    ("max_tokens 0", dict(messages=HI, max_tokens=0), "max_tokens"),
    ("max_tokens a string", dict(messages=HI, max_tokens="5"), "max_tokens"),
    ("temperature -1", dict(messages=HI, temperature=-1), "temperature"),
    ("temperature 3", dict(messages=HI, temperature=3), "temperature"),
    ("temperature a string", dict(messages=HI, temperature="0.5"), "temperature"),
    ("top_p 0", dict(messages=HI, top_p=0), "top_p"),
    ("top_p 1.5", dict(messages=HI, top_p=1.5), "top_p"),
    ("n 0", dict(messages=HI, n=0), "n"),
    ("n over the batch size", dict(messages=HI, n=1000), "n"),
    ("stream not a bool", dict(messages=HI, stream="yes"), "stream"),
    ("stream_options without stream", dict(messages=HI, stream_options={"include_usage": True}), "stream_options"),
    ("stream_options unknown", dict(messages=HI, stream=True, stream_options={"x": 1}), "stream_options.x"),
    ("stop not strings", dict(messages=HI, stop=[1]), "stop"),
    ("too many stop strings", dict(messages=HI, stop=["a", "b", "c", "d", "e"]), "stop"),
    ("empty stop string", dict(messages=HI, stop=""), "stop"),
    ("seed a float", dict(messages=HI, seed=1.5), "seed"),
    ("seed past 64 bits", dict(messages=HI, seed=2**70), "seed"),
    ("seed below a signed 64-bit", dict(messages=HI, seed=-(2**63) - 1), "seed"),
    ("repetition_penalty tiny", dict(messages=HI, repetition_penalty=1e-300), "repetition_penalty"),
    ("repetition_penalty huge", dict(messages=HI, repetition_penalty=1e300), "repetition_penalty"),
    ("unknown role", dict(messages=[{"role": "bot", "content": "hi"}]), "messages[0].role"),
    ("tool role", dict(messages=[{"role": "tool", "content": "42", "tool_call_id": "x"}]), "messages[0].role"),
    ("tool calls", dict(messages=[*HI, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
                                  *HI]), "messages[1].tool_calls"),
    ("content null", dict(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    ("content a number", dict(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    ("part type", dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages[0].content[0].type"),
    ("text part not a string", dict(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
     "messages[0].content[0].text"),
    ("image marker in text", dict(messages=text_message("look: <image>")), "messages[0].content"),
    ("image marker in a text part", dict(messages=[{"role": "user", "content": [
        {"type": "text", "text": "<image>"}]}]), "messages[0].content[0].text"),
    ("last turn the assistant's", dict(messages=[*HI, {"role": "assistant", "content": "hello"}]), "messages[1]"),
    ("message not an object", dict(messages=["hi"]), "messages[0]"),
    ("messages empty", dict(messages=[]), "messages"),
    ("messages not a list", dict(messages="hi"), "messages"),
    ("messages missing", dict(temperature=0), "messages"),
    ("lone surrogate", dict(messages=text_message("\ud800")), "messages[0].content"),
    ("lone surrogate in model", dict(model="\ud800", messages=HI), "model"),
    ("lone surrogate in a message key", dict(messages=[{"role": "user", "content": "hi", "\ud800": 1}]),
     "messages[0]"),
    ("lone surrogate in an image URL", dict(messages=_image_part("data:\ud800")), f"{IMAGE}.url"),
    ("lone surrogate in stop", dict(messages=HI, stop="\ud800"), "stop"),
    ("lone surrogate in a stop list", dict(messages=HI, stop=["x", "\ud800"]), "stop[1]"),
    ("lone surrogate in a field name", dict(messages=HI, **{"\ud800": 1}), None),
    ("tools", dict(messages=HI, tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("logprobs", dict(messages=HI, logprobs=True), "logprobs"),
    ("response_format json", dict(messages=HI, response_format={"type": "json_object"}), "response_format"),
    ("presence_penalty", dict(messages=HI, presence_penalty=0.5), "presence_penalty"),
    ("unknown field", dict(messages=HI, temprature=0.5), "temprature"),
]


def _post(server, body: bytes | dict, **kwargs) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=60, **kwargs)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(("what", "fields", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_request_names_the_field(server, what, fields, param):
    error = _error(_post(server, {"model": MODEL_NAME, **fields}), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error["message"]


def test_an_image_in_a_later_turn(server):
    # mmgpt's template renders every image first: the prompt is counted as Pipeline.chat encodes it.
    messages = [*HI, {"role": "assistant", "content": "yo"}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": "And this one?"}]}]
    r = _post(server, {"messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    text, prompt_tokens, _, _ = expected(messages)
    assert r.json()["choices"][0]["message"]["content"] == text
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens


TINY = [dict(temperature=1e-300), dict(top_p=1e-300), dict(temperature=1e-300, top_p=1e-300)]


@pytest.mark.parametrize("fields", TINY, ids=repr)
def test_tiny_temperature_and_top_p_are_greedy(server, fields):
    r = _post(server, {"messages": HI, "seed": 0, **fields})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected(HI)[0]


def test_too_many_images_are_refused_before_any_is_decoded(server, monkeypatch):
    from mmgpt.serve import app

    decoded = []
    load = app.load_image_url
    monkeypatch.setattr(app, "load_image_url", lambda *args, **kwargs: decoded.append(args) or load(*args, **kwargs))
    part = {"type": "image_url", "image_url": {"url": _png((2, 2))}}
    error = _error(_post(server, {"messages": [{"role": "user", "content": [part] * 40}]}), 400)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert decoded == []
    assert _post(server, {"messages": _image_part(_png((2, 2))), "max_tokens": 1}).status_code == 200
    assert len(decoded) == 1  # the patch is the one the server calls


@pytest.mark.parametrize(("what", "messages"), [
    ("many messages", [{"role": "user", "content": ""}] * 2000),
    ("much text", text_message("x" * 100_000)),
])
def test_long_conversations_are_refused_before_the_template_renders(server, monkeypatch, what, messages):
    from live_server import pipeline

    tokenizer = pipeline().tokenizer
    rendered = []
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: rendered.append(a) or render(*a, **k))
    error = _error(_post(server, {"messages": messages}), 400)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert rendered == []
    # A question not asked before (the templated prompts of recent ones are remembered): it is rendered.
    assert _post(server, {"messages": text_message(f"a question after {what}"), "max_tokens": 1}).status_code == 200
    assert rendered  # the patch is the one the server calls


def test_context_errors_say_so(server):
    error = _error(_post(server, {"messages": text_message("circle square " * 200)}), 400)
    assert error["code"] == "context_length_exceeded" and "128" in error["message"]


def test_accepted_defaults_and_metadata(server):
    fields = dict(
        tools=[], tool_choice="none", logprobs=False, frequency_penalty=0, presence_penalty=0.0, user="someone",
        response_format={"type": "text"}, metadata={"k": "v"}, store=False, parallel_tool_calls=True,
        stream_options=None, n=1, top_p=1, seed=None, stop=None,
    )
    r = _post(server, {"model": MODEL_NAME, "messages": HI, "temperature": 0, **fields})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected(HI)[0]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"], ids=repr)
def test_bad_json(server, body):
    error = _error(_post(server, body), 400)
    assert error["param"] is None


def test_no_content_type(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{bad", timeout=60)
    assert _error(r, 400)["param"] is None


def test_an_oversize_body_is_refused_before_it_is_read(server):
    big = {"messages": text_message("x" * (MAX_BYTES + 10))}
    error = _error(_post(server, big), 413)
    assert f"{MAX_BYTES:,}" in error["message"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    _error(_post(server, chunks()), 413)
    assert _post(server, {"messages": HI, "temperature": 0}).status_code == 200


def test_not_found_and_wrong_method(server):
    error = _error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert "/v1/nothing" in error["message"]
    _error(httpx.get(f"{server.url}/v1/chat/completions"), 405)
    assert _error(httpx.get(f"{server.url}/v1/models/gpt-4o"), 404)["code"] == "model_not_found"


def test_the_server_still_answers(server):
    for _, fields, _ in BAD[:10]:
        _post(server, fields)
    r = _post(server, {"messages": HI, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected(HI)[0]


# ``load_image_url`` itself, without a server: what a client's image_url may make the server's machine do.


@pytest.fixture
def no_subprocess(monkeypatch):
    """Records (and stops) every program PIL tries to start; it also forgets whether Ghostscript was found."""
    import subprocess

    from PIL import EpsImagePlugin

    started = []

    def refuse(*args, **kwargs):
        started.append(args[0] if args else kwargs.get("args"))
        raise OSError("no programs in this test")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "check_call", refuse)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return started


def test_postscript_is_refused_without_starting_a_program(tmp_path, no_subprocess):
    from mmgpt.serve.images import ImageURLError, load_image_url

    allowed = r"not an image in a format mmgpt reads \(PNG, JPEG, WEBP, GIF, BMP, TIFF\)"
    url = "data:image/eps;base64," + base64.b64encode(_eps()).decode()
    with pytest.raises(ImageURLError, match=rf"the data URL is {allowed}"):
        load_image_url(url)
    path = tmp_path / "scene.eps"
    path.write_bytes(_eps())
    for given in (str(path), path.as_uri()):
        with pytest.raises(ImageURLError, match=rf"cannot read image .*scene\.eps: {allowed}"):
            load_image_url(given, allow_local_files=True)
    assert no_subprocess == []


def test_url_schemes_are_case_insensitive():
    from mmgpt.serve.images import ImageURLError, load_image_url

    expected = load_image_url(data_url())
    for scheme in ("DATA", "Data"):
        image = load_image_url(scheme + data_url()[4:])
        assert image.size == expected.size and image.tobytes() == expected.tobytes()
    with pytest.raises(ImageURLError, match="not fetched"):
        load_image_url("HTTPS://example.com/cat.png")


def test_a_local_fifo_is_refused_without_blocking(tmp_path):
    import os
    import threading

    from mmgpt.serve.images import ImageURLError, load_image_url

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading waits for a writer: a server thread stuck for good
    outcome = []

    def load():
        try:
            load_image_url(str(fifo), allow_local_files=True)
        except ImageURLError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        with open(fifo, "wb"):  # a writer that closes at once: the reader sees end of file and the thread ends
            pass
        thread.join(10)
        pytest.fail("load_image_url blocked opening a FIFO")
    assert len(outcome) == 1 and "pipe.png is not a regular file" in outcome[0]


def test_the_chat_page_leaves_max_tokens_to_the_server(server):
    # The page sends max_tokens only when its field is set: the server then caps the answer by the context the
    # conversation leaves, where a fixed number would be refused (context_length_exceeded) once the conversation
    # grows past the context less that number.
    import os
    from pathlib import Path

    chromium = Path("/usr/bin/chromium")
    missing = [] if chromium.is_file() else [f"no Chromium at {chromium}"]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright Python package is not installed")
    if missing:
        if os.environ.get("MMGPT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MMGPT_REQUIRE_BROWSER=1 but {missing[0]}", pytrace=False)
        pytest.skip(missing[0])
    from live_server import pipeline

    block_size = pipeline().model.config.decoder.block_size
    question = "Is the circle left of the square? " * 9
    room = block_size - expected(text_message(question), max_tokens=1)[1]
    assert 0 < room < pipeline().generation_config.max_new_tokens  # less room than the default answer takes
    answer = expected(text_message(question), max_tokens=room)[0]
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/")
            page.wait_for_function(f"document.getElementById('model').textContent === {json.dumps(MODEL_NAME)}")
            assert page.input_value("#max-tokens") == ""
            page.fill("#prompt", question)
            with page.expect_response("**/v1/chat/completions") as response:
                page.click("#send")
            assert response.value.status == 200, response.value.text()
            assert "max_tokens" not in response.value.request.post_data_json
            page.wait_for_function("!document.querySelector('#log .pending')")
            assert page.locator("#error").is_hidden()
            assert page.locator("#log .msg.assistant .text").text_content() == answer
            # A number typed in the field is sent as it is.
            page.click("#settings summary")
            page.fill("#max-tokens", "3")
            page.fill("#prompt", "Hi")
            with page.expect_request("**/v1/chat/completions") as request:
                page.click("#send")
            assert request.value.post_data_json["max_tokens"] == 3
        finally:
            browser.close()
