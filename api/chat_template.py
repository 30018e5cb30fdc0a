"""Chat templates: render a conversation to the prompt text the model was trained on.

Rendering follows `transformers` (`utils/chat_template_utils.py`) so that the same messages give
the same prompt here as under `AutoTokenizer.apply_chat_template`: a sandboxed Jinja environment
with `trim_blocks` and `lstrip_blocks`, the globals and filters Hub templates rely on, and the
same way of cutting the output for `continue_final_message`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.api.errors import InvalidRequest

MESSAGE_FIELDS = ("role", "content")
# The roles of OpenAI's chat API that chat templates render; any other is refused rather than
# passed to a template that may drop or mangle it.
ROLES = ("system", "user", "assistant", "tool")

# Appended to the final message before rendering; where it lands shows where that message's
# content ends in the output, whatever the template writes after it.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in some
    templates; for serving it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, as transformers' sandbox does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which no chat template wants.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def validate_messages(messages: object) -> list[dict[str, str]]:
    """Check that `messages` is a non-empty list of {"role": str, "content": str} and return a
    copy; errors name the offending field, e.g. `messages[2].role`."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequest("messages", "must be a list of messages")
    if not messages:
        raise InvalidRequest("messages", "must not be empty")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidRequest(where, "must be an object with 'role' and 'content'")
        for key in message:
            if key not in MESSAGE_FIELDS:
                raise InvalidRequest(f"{where}.{key}", "unknown field")
        for key in MESSAGE_FIELDS:
            if key not in message:
                raise InvalidRequest(f"{where}.{key}", "is required")
            if not isinstance(message[key], str):
                raise InvalidRequest(f"{where}.{key}", "must be a string")
        if not message["role"]:
            raise InvalidRequest(f"{where}.role", "must not be empty")
        if message["role"] not in ROLES:
            raise InvalidRequest(
                f"{where}.role", f"{message['role']!r} is not one of {', '.join(ROLES)}"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


class ChatTemplate:
    """A compiled chat template plus the special-token variables (bos_token, eos_token, ...) that
    templates read."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(source)

    def render(
        self,
        messages: object,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """Render `messages`. With `continue_final_message` the output stops right after the
        final (assistant) message's content, so the model continues that message; it replaces
        the generation prompt, whatever `add_generation_prompt` says."""
        chat = validate_messages(messages)
        if continue_final_message:
            last = len(chat) - 1
            if chat[last]["role"] != "assistant":
                raise InvalidRequest(
                    f"messages[{last}].role",
                    "must be 'assistant' when continue_final_message is set",
                )
            final = chat[last]["content"]
            chat[last]["content"] = final + _CONTINUE_TAG
            add_generation_prompt = False
        try:
            text = self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequest("messages", f"chat template rejected the messages: {exc}") from exc
        if not continue_final_message:
            return text
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise InvalidRequest(
                "continue_final_message",
                "the chat template does not render the final message's content, so it cannot be "
                "continued",
            )
        cut = text.rindex(tag)
        if text[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return text[:cut]
        # The template trimmed the content (and the tag's trailing space): trim the cut too.
        return text[:cut].rstrip()
