"""The model's tokenizer, loaded from a Hugging Face model folder without transformers or torch.

Token ids match `transformers.AutoTokenizer.from_pretrained(folder)` exactly: `tokenizer.json`
alone decides which special tokens encoding adds (transformers 5 ignores `add_bos_token` and
`add_eos_token` in `tokenizer_config.json` whenever `tokenizer.json` is present, and so does this
class), and no truncation or padding from the file is applied.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from pdserve.api.chat_template import ChatTemplate
from pdserve.api.errors import InvalidRequest, ModelLoadError

# The named special tokens transformers passes to chat templates as variables.
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: ChatTemplate | None = None,
    ) -> None:
        self._backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.bos_token_id = self._named_id("bos_token")
        eos_ids = [*extra_eos_token_ids]
        tokenizer_eos = self._named_id("eos_token")
        if tokenizer_eos is not None:
            eos_ids.append(tokenizer_eos)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {folder} does not exist")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{tokenizer_file} is missing")
        try:
            backend = _Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ModelLoadError(f"{tokenizer_file} is not a valid tokenizer: {exc}") from exc
        backend.no_truncation()
        backend.no_padding()

        config = _read_json(folder / "tokenizer_config.json")
        special_tokens = {}
        for name in _NAMED_SPECIAL_TOKENS:
            token = _token_content(config.get(name), f"tokenizer_config.json: {name}")
            if token is not None:
                if backend.token_to_id(token) is None:
                    raise ModelLoadError(
                        f"tokenizer_config.json: {name} {token!r} is not in tokenizer.json"
                    )
                special_tokens[name] = token

        eos_ids: list[int] = []
        for file_name in ("generation_config.json", "config.json"):
            value = _read_json(folder / file_name).get("eos_token_id")
            eos_ids.extend(_token_ids(value, f"{file_name}: eos_token_id"))

        template_source = _chat_template_source(folder, config)
        template = None
        if template_source is not None:
            try:
                template = ChatTemplate(template_source, special_tokens)
            except Exception as exc:  # jinja2 syntax errors and the like
                raise ModelLoadError(f"chat_template does not compile: {exc}") from exc
        return cls(
            backend,
            special_tokens=special_tokens,
            extra_eos_token_ids=eos_ids,
            chat_template=template,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The length of the longest vocabulary entry: no token covers more characters of
        text, so a text of n characters has at least n / max_token_chars tokens."""
        return max(map(len, self._backend.get_vocab(with_added_tokens=True)), default=1)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: object,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """Render chat messages to the prompt text; see `ChatTemplate.render`."""
        if self.chat_template is None:
            raise InvalidRequest("messages", "the model has no chat template")
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def encode_chat(
        self,
        messages: object,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        # NOTE: the rendered text already holds whatever BOS the template writes, so encoding
        # adds no special tokens (as transformers does).
        text = self.apply_chat_template(messages, add_generation_prompt, continue_final_message)
        return self.encode(text, add_special_tokens=False)

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _token_content(value: object, where: str) -> str | None:
    """A special token is written either as a string or as a serialized AddedToken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelLoadError(f"{where} must be a string or an object with 'content'")


def _token_ids(value: object, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelLoadError(f"{where} must be an integer or a list of integers")
    return values


def _chat_template_source(folder: Path, config: dict[str, Any]) -> str | None:
    # A separate chat_template.jinja takes priority over the config entry, as in transformers.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {}
        for entry in template:
            if not (isinstance(entry, dict) and isinstance(entry.get("template"), str)):
                raise ModelLoadError(
                    "tokenizer_config.json: chat_template entries must be {name, template}"
                )
            named[entry.get("name")] = entry["template"]
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
        return None
    raise ModelLoadError("tokenizer_config.json: chat_template must be a string or a list")
