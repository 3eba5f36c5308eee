"""OpenAI's chat completions protocol as ``mmgpt serve`` speaks it: the request model, its checks, and the JSON of
responses, stream chunks and errors.

The request is OpenAI's (``/v1/chat/completions``). Fields mmgpt cannot honour are refused by name with a 400 when
they ask for something (``tools``, ``logprobs: true``, ``response_format: json_object``, a penalty other than 0)
and accepted when they hold their default, so a client that always sends them still works; a silently ignored
field would return an answer the caller did not ask for. ``top_k``, ``min_p`` and ``repetition_penalty`` are
accepted as extra parameters, as vLLM does (``extra_body=`` in the ``openai`` client).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's documented default; mmgpt's own generate() defaults to greedy. temperature=0 is greedy here.
DEFAULT_TEMPERATURE = 1.0
MAX_STOP_STRINGS = 4  # OpenAI's limit
# Below this a temperature divides float32 logits past their range (inf, then NaN probabilities); as vLLM does, it
# is read as greedy, which is what such a temperature tends to anyway.
GREEDY_TEMPERATURE = 1e-5


class APIError(Exception):
    """An error answered with OpenAI's JSON: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status.
        message: what was wrong and what is expected.
        param: the request field at fault (``messages[1].content[0].image_url``), or ``None``.
        type: OpenAI's error type.
        code: OpenAI's error code (``"context_length_exceeded"``, ``"model_not_found"``), or ``None``.
    """

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.type, self.code)


def error_body(
    message: str, param: str | None = None, type: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code=code)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


# Strict: "0.5" is not a temperature and 1 is not True, as OpenAI answers. Ranges are OpenAI's (top_p > 0 as vLLM:
# top_p=0 would keep no token). Extra fields are kept for `check_unsupported`, which names them.
class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``. ``messages`` and ``stop`` are checked by ``app`` (their errors name
    the message and part at fault, which pydantic's union errors would not)."""

    model_config = ConfigDict(extra="allow", strict=True)

    messages: Any = Field(..., description="the conversation: OpenAI's messages, text and image_url parts")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1.0 (sampling)")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Any = None
    # torch.Generator.manual_seed's range: a 64-bit seed, signed or not.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling parameters (GenerationConfig's fields).
    top_k: int | None = Field(None, ge=0, description="0 or null keeps every token (OpenAI has no top_k)")
    min_p: float | None = Field(None, ge=0, le=1)
    # The logits of seen tokens are divided or multiplied by it: far from 1 they leave float32's range (inf, NaN).
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)


def _is_default(value: Any, *defaults: Any) -> bool:
    return value is None or any(value == d and type(value) is type(d) for d in defaults)


# OpenAI fields that change the answer or its format, with the values that ask for nothing mmgpt lacks. Metadata
# fields (user, metadata, store: false, service_tier) change nothing and are accepted as they are.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "store": (False,),
    "echo": (False,),
    "best_of": (1,),
    "ignore_eos": (False,),
}
_METADATA = {"user", "metadata", "service_tier", "safety_identifier", "prompt_cache_key"}


def check_unsupported(request: ChatCompletionRequest) -> None:
    """Refuse, by name, a field mmgpt would otherwise ignore although it asks for something."""
    for name, value in (request.model_extra or {}).items():
        if name in _METADATA:
            continue
        if name not in _DEFAULT_ONLY:
            if value is None:
                continue
            raise bad_request(f"{name} is not a chat completions parameter mmgpt serve knows", name)
        if not _is_default(value, *_DEFAULT_ONLY[name]):
            raise bad_request(f"{name}={_short(value)} is not supported by mmgpt serve", name)
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


def check_stop(stop: Any) -> list[str] | None:
    """``stop``: a string, a list of up to 4 strings, or null; as a list of non-empty strings (or ``None``)."""
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"stop must be a string or a list of strings, got {_short(stop)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    if not all(stops):
        raise bad_request("stop strings must not be empty (every text contains '')", "stop")
    return stops or None


def check_unicode(request: ChatCompletionRequest) -> None:
    """Refuse a string anywhere in the request (a value or a key) that is not valid Unicode: a lone surrogate
    (``"\\ud800"``), which JSON can spell but no UTF-8 text holds, so that it reaches neither the model nor an
    error message. The error names where it is (``messages[0].content[1].image_url.url``), never the string."""
    fields = {name: getattr(request, name) for name in type(request).model_fields}
    for name, value in (request.model_extra or {}).items():
        _check_key(name, None)
        fields[name] = value
    for name, value in fields.items():
        _check_strings(value, name)


def _check_key(key: str, where: str | None) -> None:
    if isinstance(key, str) and not _is_unicode(key):
        place = "the request body" if where is None else where
        raise bad_request(f"{place} has a field name that is not valid Unicode (a lone surrogate)", where)


def _check_strings(value: Any, where: str) -> None:
    if isinstance(value, str):
        if not _is_unicode(value):
            raise bad_request(f"{where} is not valid Unicode text (it holds a lone surrogate)", where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_key(key, where)
            _check_strings(item, f"{where}.{key}")


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")  # in C: a base64 image of megabytes costs little
    except UnicodeEncodeError:
        return False
    return True


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    id: str, created: int, model: str, texts: list[str], finish_reasons: list[str], usage: dict[str, int]
) -> dict[str, Any]:
    """A ``chat.completion`` object: one choice per text."""
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [
            {
                "index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(zip(texts, finish_reasons, strict=True))
        ],
        "usage": usage,
    }


def chunk(
    id: str, created: int, model: str, choices: list[dict[str, Any]], with_usage: bool,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``. With ``stream_options.include_usage`` every chunk has a ``usage`` field, null
    but in the last one (whose ``choices`` is empty), as OpenAI sends them."""
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = usage
    return out


def delta(index: int, content: str | None = None, role: bool = False, finish_reason: str | None = None) -> dict:
    d: dict[str, Any] = {}
    if role:
        d["role"] = "assistant"
    if content is not None:
        d["content"] = content
    return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish_reason}
