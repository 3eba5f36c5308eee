"""``mmgpt serve``'s web app: OpenAI's chat completions API on FastAPI, decoded in batches.

    POST /v1/chat/completions   OpenAI's chat completions, streamed (SSE) or not
    GET  /v1/models             the one model served, in OpenAI's list format
    GET  /health                liveness, queue length and the batcher's counters
    GET  /                      the chat page (mmgpt/serve/static/index.html), /static/... beside it

A request is checked, its images decoded and its prompt tokenized in a worker thread of the event loop, so a bad
one is refused with a 400 naming the field before it is queued; then the ``Batcher``'s thread decodes it, joining
the running batch (continuous batching). Every error is OpenAI's JSON,
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmgpt.messages import ROLES
from mmgpt.pipeline import Pipeline
from mmgpt.serve import protocol
from mmgpt.serve.batcher import Batcher, Done, Event, Failed, Job, QueueFull, Sampling, Step
from mmgpt.serve.images import DEFAULT_MAX_IMAGE_PIXELS, ImageURLError, load_image_url
from mmgpt.serve.protocol import APIError, ChatCompletionRequest, bad_request

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # a few inline images as base64

_PLACEHOLDER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mmgpt serve</title></head>
<body><h1>mmgpt serve</h1>
<p>The chat page is not installed. The API is at <code>/v1/chat/completions</code> (OpenAI's chat completions);
<a href="/v1/models">/v1/models</a> lists the model, <a href="/docs">/docs</a> describes the API.</p>
</body></html>
"""

# GenerationConfig's fields, as the request names them (a config error names the request's field).
_CONFIG_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "num_return_sequences": "n", "max_new_tokens": "max_tokens",
    "stop_strings": "stop",
}
# The place parse_messages names in its errors: "messages[1].content[0].text holds ...".
_WHERE = re.compile(r"(?:conversation \d+: )?(messages(?:\[\d+\]|\.[A-Za-z_]+)*)")
# Message fields besides role and content that may be present when they ask for nothing.
_MESSAGE_FIELDS_DEFAULT = {"tool_calls", "function_call", "tool_call_id", "refusal", "audio"}
_ARRIVAL = "mmgpt.arrival"  # the ASGI scope key of a chat request's Batcher.arriving mark


def create_app(
    pipeline: Pipeline,
    model_name: str = "mmgpt",
    *,
    allow_local_files: bool = False,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_size: int = 16,
    max_queue: int = 256,
    batch_wait_s: float = 0.02,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    default_max_tokens: int | None = None,
) -> FastAPI:
    """The OpenAI-compatible app for one model.

    Args:
        pipeline: the model to serve (``mmgpt.load()``); the app's batcher thread is the only one decoding with it.
        model_name: the name ``/v1/models`` lists; a request naming another model is a 404, as vLLM answers.
        allow_local_files: read ``image_url``s that are paths or ``file://`` URLs from this machine. Off by
            default: anyone who can reach the server could otherwise read its image files.
        max_request_bytes: larger bodies are refused (413) before they are parsed.
        max_batch_size: the most rows decoded together (a request with ``n`` sampled choices is ``n`` rows); also
            the largest ``n``.
        max_queue: the most requests waiting; more are refused with a 503 (the ``openai`` client retries).
        batch_wait_s: the longest a request waits for others to share its prefill: others being received at the
            same time, to start a batch with (a request alone never waits), or others queued, to join the running
            batch with (see ``Batcher``).
        max_image_pixels: the largest image (width x height) accepted.
        default_max_tokens: ``max_tokens`` when a request gives none (default: the pipeline's
            ``generation_config.max_new_tokens``, 48 for the shipped model), capped by the context left after the
            prompt.

    Returns:
        A FastAPI app; ``app.state.batcher`` is its ``Batcher``.
    """
    batcher = Batcher(pipeline, max_batch_size=max_batch_size, max_queue=max_queue, batch_wait_s=batch_wait_s)
    block_size = pipeline.model.config.decoder.block_size
    bounds = _PromptBounds(pipeline)
    if default_max_tokens is None:
        default_max_tokens = pipeline.generation_config.max_new_tokens
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="mmgpt serve", description="OpenAI-compatible chat completions", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.model_name = model_name
    app.add_middleware(_BodyLimit, max_bytes=max_request_bytes, batcher=batcher)
    _error_handlers(app)

    # Per event loop: one serves the app, though a test client may run it on another.
    handoffs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Handoff] = weakref.WeakKeyDictionary()

    def handoff(loop: asyncio.AbstractEventLoop) -> _Handoff:
        if loop not in handoffs:
            handoffs[loop] = _Handoff(loop)
        return handoffs[loop]

    def load_image(url: str) -> Any:
        return load_image_url(url, allow_local_files=allow_local_files, max_pixels=max_image_pixels)

    def prepare(request: ChatCompletionRequest) -> tuple[Job, int]:
        """Check a request, decode its images and count its prompt: the job to queue, with its prompt tokens
        (the job's sink is set by the caller)."""
        protocol.check_unicode(request)
        protocol.check_unsupported(request)
        if request.model is not None and request.model != model_name:
            raise APIError(
                404, f"The model `{request.model}` does not exist; this server serves `{model_name}`", "model",
                code="model_not_found",
            )
        stop = protocol.check_stop(request.stop)
        n = 1 if request.n is None else request.n
        if n > max_batch_size:
            raise bad_request(f"n={n} is more than this server decodes at once ({max_batch_size})", "n")
        bounds.check(request.messages)  # before any image is decoded or any text templated
        conversation = to_conversation(request.messages, load_image)
        try:  # the pipeline's own checks (parse_messages) and count: the prompt the batcher encodes is this one
            prompt_tokens = pipeline.count_chat_tokens(conversation)
        except (TypeError, ValueError) as e:
            # Its advice names Pipeline.chat's image parts; a request sends image_url parts.
            message = str(e).replace('{"type": "image", "image": ...}', '{"type": "image_url", ...}')
            m = _WHERE.match(message)
            raise bad_request(message if m else f"the messages cannot be encoded: {message}",
                              m[1] if m else "messages") from None
        if prompt_tokens >= block_size:
            raise bad_request(
                f"This model's maximum context length is {block_size} tokens, and the messages are {prompt_tokens} "
                f"tokens (images included), leaving none for the answer. Shorten the messages or send fewer images",
                "messages", code="context_length_exceeded",
            )
        field, requested = next(
            ((name, getattr(request, name)) for name in ("max_completion_tokens", "max_tokens")
             if getattr(request, name) is not None),
            ("max_tokens", None),
        )
        if requested is not None and prompt_tokens + requested > block_size:
            raise bad_request(
                f"This model's maximum context length is {block_size} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the "
                f"completion). Lower {field} to at most {block_size - prompt_tokens} or shorten the messages",
                field, code="context_length_exceeded",
            )
        max_tokens = requested if requested is not None else min(default_max_tokens, block_size - prompt_tokens)
        sampling = _sampling(request, n)
        try:  # the engine's own checks, before anything is queued
            sampling.config(max_tokens, pipeline.generation_config, stop)
        except (TypeError, ValueError) as e:
            name = str(e).split(" ", 1)[0]
            raise bad_request(str(e), _CONFIG_FIELDS.get(name)) from None
        job = Job(conversation, prompt_tokens, max_tokens, sampling, sink=_ignore, n=n, stop=stop)
        return job, prompt_tokens

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = request.scope.get(_ARRIVAL)
        try:
            job, prompt_tokens = await run_in_threadpool(prepare, body)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Event | None] = asyncio.Queue()
            job.sink = handoff(loop).sink(events)
            batcher.start()  # started by the lifespan; here too for servers that skip it
            try:
                batcher.submit(job)
            except QueueFull as e:
                raise APIError(
                    503, f"the server is busy ({e}); retry later", type="server_error", headers={"Retry-After": "1"}
                ) from None
        finally:
            if arrival is not None:
                arrival.done()
        id, created = protocol.completion_id(), protocol.now()
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            stream = _stream(job, events, id, created, model_name, prompt_tokens, include_usage)
            return StreamingResponse(
                stream, media_type="text/event-stream", background=BackgroundTask(job.cancel),
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(request, job, events, id, created, model_name, prompt_tokens)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        if model != model_name:
            raise APIError(404, f"The model `{model}` does not exist", "model", code="model_not_found")
        return _model_card(model_name, created)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "model": model_name, "queued": batcher.queued, "batches": batcher.batches,
            "requests": batcher.requests, "recent_batch_sizes": list(batcher.batch_sizes)[-16:],
            "joined": batcher.joined, "steps": batcher.steps, "row_steps": batcher.row_steps,
        }

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Response:
        page = STATIC / "index.html"
        if page.is_file():
            return HTMLResponse(page.read_text(encoding="utf-8"))
        return HTMLResponse(_PLACEHOLDER_PAGE)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _PromptBounds:
    """What a request's messages must cost at the least, counted from the request as sent: one that is sure to
    exceed the context is refused before its images are decoded and its text templated (work that grows with the
    request). Each bound is one no prompt within the context can pass.

    * images: each costs ``image_seq_len`` tokens at the least (a tiled picture more: its tiles and global view; a
      packed LLaVA-OneVision picture one tile and its newline, or more when it is split);
    * messages: the chat template writes a role tag, at least one token, for every message;
    * text: a token stands for at most as many characters as the longest string in the vocabulary (a byte-level
      token's string has a character per byte, and a character has at least one byte). Not bounded when the
      tokenizer normalizes text, which may drop characters.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.block_size = pipeline.model.config.decoder.block_size
        model = pipeline.model
        # The fewest placeholders an image can take; an anyres model has no single image_seq_len.
        self.image_tokens = model.packer.layout.patch_grid**2 + 1 if model.packer is not None else model.image_seq_len
        backend = getattr(pipeline.tokenizer, "backend_tokenizer", None)
        normalizes = backend is None or backend.normalizer is not None
        longest = max(map(len, pipeline.tokenizer.get_vocab()))
        self.max_chars = None if normalizes else self.block_size * longest

    def check(self, messages: Any) -> None:
        """Raise a 400 (``context_length_exceeded``) for messages that cannot fit; anything malformed is left to
        ``to_conversation`` to name."""
        if not isinstance(messages, list):
            return
        images = chars = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict):
                        continue
                    if part.get("type") == "image_url":
                        images += 1
                    elif isinstance(part.get("text"), str):
                        chars += len(part["text"])
        context = f"This model's maximum context length is {self.block_size} tokens"
        if len(messages) >= self.block_size:
            raise bad_request(
                f"{context}, and the {len(messages)} messages take at least one token each, leaving none for the "
                "answer. Send fewer messages", "messages", code="context_length_exceeded",
            )
        if images * self.image_tokens >= self.block_size:
            raise bad_request(
                f"{context}, and the {images} images take at least {self.image_tokens} tokens each, leaving none "
                "for the answer. Send fewer images", "messages", code="context_length_exceeded",
            )
        if self.max_chars is not None and chars > self.max_chars:
            raise bad_request(
                f"{context}, and the messages' {chars:,} characters of text are more than that many tokens can "
                "hold. Shorten the messages", "messages", code="context_length_exceeded",
            )


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mmgpt"}


def _ignore(event: Event) -> None:
    pass


def _sampling(request: ChatCompletionRequest, n: int) -> Sampling:
    """OpenAI's sampling semantics: temperature 1.0 unless given, 0 (or below ``protocol.GREEDY_TEMPERATURE``) is
    greedy; no top-k unless asked (vLLM's extra parameter). Greedy ignores the sampling filters and the seed, as
    OpenAI's temperature 0 does."""
    temperature = protocol.DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    repetition_penalty = 1.0 if request.repetition_penalty is None else request.repetition_penalty
    if temperature < protocol.GREEDY_TEMPERATURE:
        return Sampling(do_sample=False, repetition_penalty=repetition_penalty)
    return Sampling(
        do_sample=True, temperature=temperature, top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or None, min_p=request.min_p, repetition_penalty=repetition_penalty,
        num_return_sequences=n, seed=request.seed,
    )


def to_conversation(messages: Any, load_image: Callable[[str], Any]) -> list[dict[str, Any]]:
    """OpenAI messages -> ``Pipeline.encode_chat``'s: ``image_url`` parts decoded to ``{"type": "image", "image":
    PIL}``, ``developer`` read as ``system``. Parts keep their indices, so the errors of ``parse_messages`` name the
    request's own fields.

    Raises:
        APIError: 400 naming the message or part: not a message, an unsupported role, part type or field, an
            image that cannot be used.
    """
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} messages", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role in ("tool", "function"):
            raise bad_request(f"{where}.role: {role} messages are not supported (mmgpt serve has no tools)",
                              f"{where}.role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of system, user, assistant, developer; got {role!r:.40}",
                              f"{where}.role")
        for key, value in m.items():
            if key in ("role", "content", "name") or (key in _MESSAGE_FIELDS_DEFAULT and value in (None, [])):
                continue
            raise bad_request(f"{where}.{key} is not supported by mmgpt serve", f"{where}.{key}")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(
                f"{where}.content must be a string or a list of text and image_url parts, got "
                f"{type(content).__name__ if content is not None else 'null'}", f"{where}.content",
            )
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise bad_request(f"{pwhere} must be an object with a type", pwhere)
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad_request(f"{pwhere}.text must be a string", f"{pwhere}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                parts.append({"type": "image", "image": _image(part.get("image_url"), role, pwhere, load_image)})
            else:
                raise bad_request(
                    f"{pwhere}.type must be 'text' or 'image_url', got {kind!r:.40}", f"{pwhere}.type"
                )
        out.append({"role": role, "content": parts})
    return out


def _image(image_url: Any, role: str, where: str, load_image: Callable[[str], Any]) -> Any:
    param = f"{where}.image_url"
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise bad_request(f"{param} must be an object {{\"url\": \"data:image/...;base64,...\"}}", param)
    if image_url.get("detail") not in (None, "auto", "low", "high"):
        raise bad_request(f"{param}.detail must be auto, low or high", f"{param}.detail")
    if role == "assistant":  # before decoding it: the model writes text
        raise bad_request(f"{where}: an assistant message cannot hold an image", where)
    try:
        return load_image(url)
    except ImageURLError as e:
        raise bad_request(f"{param}: {e}", param) from None


class _Handoff:
    """Hands the batcher's events to the event loop in bunches.

    A decode step sends an event to every running request; handing each over on its own would wake the loop once
    per row and step (a write to its self-pipe each), and the loop and the batcher's thread would then take turns
    for the GIL as often. Here the first event of a bunch schedules one callback, and the events sent until it runs
    go with it: about one wakeup per step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list[tuple[asyncio.Queue, Event]] = []

    def sink(self, queue: asyncio.Queue) -> Callable[[Event], None]:
        """A ``Job.sink`` that puts events on ``queue`` (a queue of this loop), from any thread."""

        def put(event: Event) -> None:
            with self.lock:
                self.pending.append((queue, event))
                if len(self.pending) > 1:
                    return  # the callback scheduled for the first one takes this one too
            with contextlib.suppress(RuntimeError):  # the loop has closed (the server is stopping)
                self.loop.call_soon_threadsafe(self._deliver)

        return put

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


async def _complete(
    request: Request, job: Job, events: asyncio.Queue, id: str, created: int, model: str, prompt_tokens: int
) -> Response:
    """Collect a non-streamed answer. A client that leaves while it waits cancels its rows."""

    async def watch_disconnect() -> None:
        # The body has been read: the next message is the client leaving (or the server ending the response).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()
        events.put_nowait(None)

    watcher = asyncio.create_task(watch_disconnect())
    texts, reasons = [""] * job.n, ["stop"] * job.n
    try:
        while True:
            event = await events.get()
            if event is None:  # the client has gone; nobody reads this
                return Response(status_code=499)
            if isinstance(event, Failed):
                raise _server_error(event.error)
            if isinstance(event, Done):
                usage = protocol.usage(prompt_tokens, event.completion_tokens)
                return JSONResponse(protocol.completion(id, created, model, texts, reasons, usage))
            for i, piece in event.pieces.items():
                texts[i] += piece
            for i, reason in event.finished.items():
                reasons[i] = reason
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once it is done; frees its rows if this coroutine was cancelled


async def _stream(
    job: Job, events: asyncio.Queue, id: str, created: int, model: str, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a chunk with the role per choice, content deltas, a chunk per choice with its
    finish_reason, the usage chunk when asked, then ``data: [DONE]``."""

    def sse(chunk_choices: list[dict], usage: dict | None = None) -> str:
        chunk = protocol.chunk(id, created, model, chunk_choices, include_usage, usage)
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    try:
        yield sse([protocol.delta(i, "", role=True) for i in range(job.n)])
        while True:
            event = await events.get()
            if isinstance(event, Failed):
                # The status line is sent already: the error goes as an event, as OpenAI and vLLM send it.
                error = _server_error(event.error)
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            if isinstance(event, Done):
                if include_usage:
                    yield sse([], protocol.usage(prompt_tokens, event.completion_tokens))
                yield "data: [DONE]\n\n"
                return
            if isinstance(event, Step):
                for i, piece in event.pieces.items():
                    yield sse([protocol.delta(i, piece)])
                for i, reason in event.finished.items():
                    yield sse([protocol.delta(i, finish_reason=reason)])
    finally:
        job.cancel()  # the client left mid-stream: its rows are dropped, the batch goes on


def _server_error(error: BaseException) -> APIError:
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")


def _param(loc: tuple) -> str | None:
    """A pydantic location as a request field: ``("body", "messages", 0, "role")`` -> ``messages[0].role``."""
    parts = [p for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out or None


def _error_handlers(app: FastAPI) -> None:
    def error_response(error: APIError) -> JSONResponse:
        return _ErrorResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "")
            return error_response(bad_request(f"the request body is not valid JSON: {reason}".rstrip(": ")))
        param = _param(tuple(first.get("loc", ())))
        if param is None:
            return error_response(bad_request(f"the request body must be a JSON object: {first.get('msg')}"))
        got = f" (got {first['input']!r:.60})" if "input" in first and first.get("type") != "missing" else ""
        return error_response(bad_request(f"{param}: {first.get('msg')}{got}", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if exc.status_code != 404 else f"Invalid URL ({request.method} {request.url.path})"
        return error_response(APIError(exc.status_code, str(message), headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


class _ErrorResponse(JSONResponse):
    """Error JSON in ASCII: a message that quotes the request (a field name, a value) stays valid UTF-8 whatever
    the request held, where JSONResponse's UTF-8 would fail on a lone surrogate and the client get no answer."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class _BodyLimit:
    """Reads a request's body before the app sees it, refusing it (413) as soon as it is known to exceed
    ``max_bytes``: from its Content-Length before reading a byte, or counted as it arrives (a chunked body has no
    length, and a client may send more than it said).

    A chat completion is marked ``batcher.arriving`` from its first byte until it is queued or refused, so that a
    batcher about to start a batch without it waits for it.
    """

    def __init__(self, app: Any, max_bytes: int, batcher: Batcher) -> None:
        self.app, self.max_bytes, self.batcher = app, max_bytes, batcher

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and scope["path"] == "/v1/chat/completions":
            # Withdrawn by the handler once the request is queued (or refused); here whatever happened before.
            arrival = scope[_ARRIVAL] = self.batcher.arriving()
            try:
                await self._call(scope, receive, send)
            finally:
                arrival.done()
            return
        await self._call(scope, receive, send)

    async def _call(self, scope: dict, receive: Callable, send: Callable) -> None:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                shown = length[:20].decode(errors="replace")
                await self._refuse(scope, send, 400, f"Content-Length {shown!r} is not a number")
                return
            if declared > self.max_bytes:
                await self._refuse(
                    scope, send, 413,
                    f"the request body is {declared:,} bytes, more than this server's limit of {self.max_bytes:,}",
                )
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(
                    scope, send, 413, f"the request body is more than this server's limit of {self.max_bytes:,} bytes"
                )
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: dict, send: Callable, status: int, message: str) -> None:
        await _ErrorResponse(protocol.error_body(message), status_code=status)(scope, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}
