"""OpenAI's completion and chat completion bodies, translated to and from the router's own
messages: a JSON body becomes a `GenerateRequest`, and the `GenerateResponse`s of the request
become OpenAI's objects (whole, or chunk by chunk for a stream).

Only shapes are checked here (a number where a number goes, n == 1); values are checked once,
by the router's validation, whose errors `openai_param` renames to the fields the client sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.api.errors import InvalidRequest
from pdserve.api.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb

# Fields of both endpoints; the last five are vLLM's extensions (`vllm bench serve` sends
# ignore_eos). `user` only identifies the caller and is not used.
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "logprobs",
    "n",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "priority",
}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo"}
# OpenAI field -> SamplingOptions field, and the JSON types it takes.
_NUMBERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}
_INTEGERS = {"seed": "seed", "top_k": "top_k"}


@dataclass(frozen=True)
class OpenAIRequest:
    """`logprobs` is the number of alternatives to report per token, None for no logprobs;
    `max_tokens_field` is the name the client used for the length limit."""

    chat: bool
    request: pb.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    max_tokens_field: str = "max_tokens"


def parse_request(body: Any, *, chat: bool, request_id: str) -> OpenAIRequest:
    """Raises `InvalidRequest` naming the OpenAI field."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    # NOTE: OpenAI's clients send null for "not given".
    body = {k: v for k, v in body.items() if v is not None}
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in body:
        if name not in allowed:
            raise InvalidRequest(name, "unknown field, or not supported by this server")
    request = pb.GenerateRequest(request_id=request_id)
    if chat:
        _set_messages(request, body)
    else:
        _set_prompt(request, body)
    if _get(body, "n", int, 1) != 1:
        raise InvalidRequest("n", "only n=1 is supported")
    if _get(body, "echo", bool, False):
        raise InvalidRequest("echo", "echo=true is not supported")
    sampling = request.sampling
    max_tokens_field = "max_tokens"
    for name in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        if name in body:
            _set(sampling, "max_tokens", _get(body, name, int), name)
            max_tokens_field = name
            break
    for name, target in _NUMBERS.items():
        if name in body:
            _set(sampling, target, _get(body, name, float), name)
    for name, target in _INTEGERS.items():
        if name in body:
            _set(sampling, target, _get(body, name, int), name)
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    sampling.stop.extend(stop)
    if "ignore_eos" in body:
        sampling.ignore_eos = _get(body, "ignore_eos", bool)
    if "priority" in body:
        _set(request, "priority", _get(body, "priority", int), "priority")
    logprobs = _logprobs(body, chat)
    if logprobs is not None:
        _set(sampling, "logprobs", logprobs, "top_logprobs" if chat else "logprobs")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise InvalidRequest("stream_options", "is only allowed with stream=true")
    unknown = set(options) - {"include_usage"}
    if unknown:
        raise InvalidRequest(f"stream_options.{sorted(unknown)[0]}", "unknown field")
    include_usage = _get(options, "include_usage", bool, False, "stream_options.include_usage")
    return OpenAIRequest(chat, request, stream, include_usage, logprobs, max_tokens_field)


def openai_param(error_field: str, parsed: OpenAIRequest | None) -> str:
    """The OpenAI name of a field that the router's validation named."""
    name = error_field.removeprefix("sampling.")
    if name == "max_tokens" and parsed is not None:
        return parsed.max_tokens_field
    if name == "logprobs" and parsed is not None and parsed.chat:
        return "top_logprobs"
    if name.startswith("chat."):
        return name.removeprefix("chat.")
    if name in ("chat", "input"):
        return "messages" if parsed is not None and parsed.chat else "prompt"
    if name == "text":
        return "prompt"
    if name.startswith("token_ids"):
        return "prompt" + name.removeprefix("token_ids").removeprefix(".ids")
    return name


def _get(
    body: dict[str, Any], name: str, kind: type, default: Any = None, path: str | None = None
) -> Any:
    value = body.get(name, default)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise InvalidRequest(path or name, f"must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", dict: "an object"}


def _set(message: Any, target: str, value: Any, name: str) -> None:
    """Sets a proto field; a value the field's type cannot hold is refused naming `name`."""
    try:
        setattr(message, target, value)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(name, f"{value!r} is out of range ({e})") from None


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if not chat:
        return _get(body, "logprobs", int) if "logprobs" in body else None
    wanted = _get(body, "logprobs", bool, False)
    if "top_logprobs" in body and not wanted:
        raise InvalidRequest("top_logprobs", "requires logprobs=true")
    return _get(body, "top_logprobs", int, 0) if wanted else None


def _set_messages(request: pb.GenerateRequest, body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(where, "must be an object with role and content")
        for key in message:
            if key not in ("role", "content"):
                raise InvalidRequest(f"{where}.{key}", "unknown field, or not supported")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"{where}.role", "must be a string")
        content = _content(message.get("content", ""), f"{where}.content")
        request.chat.messages.append(pb.ChatMessage(role=role, content=content))


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidRequest(f"{where}[{j}].type", "only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}[{j}].text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _set_prompt(request: pb.GenerateRequest, body: dict[str, Any]) -> None:
    """A string, a list of token ids, or a list holding one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        request.token_ids.SetInParent()
        try:
            request.token_ids.ids.extend(prompt)
        except ValueError:  # past int64
            raise InvalidRequest("prompt", "holds a token id out of range") from None
    elif (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, (str, list)) for p in prompt)
    ):
        raise InvalidRequest("prompt", "only one prompt per request is supported")
    else:
        raise InvalidRequest("prompt", "must be a string or a list of token ids")


@dataclass
class Answer:
    """Folds one request's `GenerateResponse`s into OpenAI's objects."""

    parsed: OpenAIRequest
    model: str
    tokenizer: Tokenizer
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    _logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    _sent_role: bool = False
    _text_offset: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.parsed.chat else "cmpl-"
        self.id = prefix + self.parsed.request.request_id

    @property
    def _object(self) -> str:
        return "chat.completion" if self.parsed.chat else "text_completion"

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.parsed.chat else "text_completion"

    def add(self, response: pb.GenerateResponse) -> None:
        self.text += response.text
        self._logprobs.extend(response.logprobs)
        self._finish(response)

    def whole(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if self.parsed.chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
        choice["logprobs"] = self._render_logprobs(self._logprobs)
        return {**self._head(self._object), "choices": [choice], "usage": self.usage}

    def chunk(self, response: pb.GenerateResponse) -> dict[str, Any] | None:
        """The stream chunk for `response`, or None when it carries nothing to show."""
        self._finish(response)
        if not (response.text or response.logprobs or self.finish_reason or not self._sent_role):
            return None
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if self.parsed.chat:
            delta: dict[str, Any] = {"content": response.text}
            if not self._sent_role:
                delta = {"role": "assistant", **delta}
            choice["delta"] = delta
        else:
            choice["text"] = response.text
        self._sent_role = True
        choice["logprobs"] = self._render_logprobs(response.logprobs)
        out = {**self._head(self._chunk_object), "choices": [choice]}
        if self.parsed.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream with `include_usage`: no choices, the usage."""
        return {**self._head(self._chunk_object), "choices": [], "usage": self.usage}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _finish(self, response: pb.GenerateResponse) -> None:
        if not response.finish_reason:
            return
        self.finish_reason = response.finish_reason
        u = response.usage
        self.usage = {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
        }

    def _render_logprobs(self, logprobs: Any) -> dict[str, Any] | None:
        if self.parsed.logprobs is None:
            return None
        if self.parsed.chat:
            return {
                "content": [
                    {
                        **self._entry(lp.token_id, lp.logprob),
                        "top_logprobs": [self._entry(t.token_id, t.logprob) for t in lp.top],
                    }
                    for lp in logprobs
                ]
            }
        tokens = [self.tokenizer.decode([lp.token_id]) for lp in logprobs]
        offsets = []
        for t in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [
                {self.tokenizer.decode([t.token_id]): t.logprob for t in lp.top} for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self.tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
