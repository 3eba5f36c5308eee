"""A live ``mmgpt serve`` for the server tests: ``create_app`` run by uvicorn in a background thread on a free
127.0.0.1 port, and the helpers the tests share (not a conftest: ``from conftest import`` in other test files
must keep finding tests/conftest.py)."""

from __future__ import annotations

import base64
import contextlib
import functools
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mmgpt
from mmgpt.generation.engine import generate as generate_ids
from mmgpt.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "assets" / "examples"
MODEL_NAME = "mmgpt-test"


@functools.cache
def pipeline() -> Pipeline:
    """The shipped default model, loaded once for every server test module."""
    return mmgpt.load()


def data_url(path: Path = EXAMPLES / "0.png", media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode()


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[Any]:
    """``create_app(pipeline(), MODEL_NAME, **kwargs)`` served on a free port; yields a namespace with ``url``
    (``http://127.0.0.1:PORT``), ``app`` and ``batcher``."""
    import uvicorn

    from mmgpt.serve.app import create_app

    app = create_app(pipeline(), MODEL_NAME, **kwargs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield type("Server", (), {"url": f"http://127.0.0.1:{port}", "app": app, "batcher": app.state.batcher})
    finally:
        server.should_exit = True
        thread.join(30)


def client(server: Any, **kwargs: Any):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, **kwargs)


def expected(messages: Sequence[dict], max_tokens: int = 48, **kwargs: Any) -> tuple[str, int, int, str]:
    """What the server must answer for OpenAI ``messages`` (greedy unless ``kwargs`` say otherwise), computed with
    the pipeline directly: ``(text, prompt_tokens, completion_tokens, finish_reason)``."""
    p = pipeline()
    conversation = to_mmgpt(messages)
    text = p.chat(conversation, max_new_tokens=max_tokens, **kwargs)
    ids, mask, embeds = p.encode_chat([conversation])
    config = p.generation_config.update(max_new_tokens=max_tokens, **kwargs)
    new = generate_ids(p.model, ids, mask, image_embeds=embeds, generation_config=config, tokenizer=p.tokenizer)
    new = new[0].tolist()
    eos, pad = config.eos_token_id, config.pad_token_id
    if eos in new:
        return text, int(mask.sum()), new.index(eos) + 1, "stop"
    # A stop string ends a row without eos: pad fills the rest (the model never writes pad itself).
    completion = len(new)
    while completion and new[completion - 1] == pad:
        completion -= 1
    return text, int(mask.sum()), completion, "stop" if completion < max_tokens else "length"


def to_mmgpt(messages: Sequence[dict]) -> list[dict]:
    """OpenAI messages with data-URL images -> ``Pipeline.chat``'s, images as PIL images."""
    import io

    from PIL import Image

    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "text":
                    parts.append(part)
                else:
                    raw = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    parts.append({"type": "image", "image": Image.open(io.BytesIO(raw)).convert("RGB")})
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


def image_message(text: str, path: Path = EXAMPLES / "0.png") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(path)}}, {"type": "text", "text": text},
    ]}]


def text_message(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]

