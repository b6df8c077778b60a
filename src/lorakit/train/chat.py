"""Chat data for causal-LM fine-tuning: conversation files, a chat template, and loss masks.

Three JSON-lines formats are read, detected per file from its first record:

- OpenAI fine-tuning: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
- ShareGPT: {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": "..."}]}
- prompt/completion: {"prompt": "...", "completion": "..."}, read as one user turn and one assistant turn.

Every conversation becomes a list of {"role", "content"} messages, rendered with a Jinja chat
template: the tokenizer's own, or DEFAULT_CHAT_TEMPLATE for models without one. The template is
stored next to the adapter (chat_template.jinja, the name transformers uses) so that a server
formats prompts exactly as training did. The loss is on the assistant turns only: their content
and the end-of-turn token after it, so that the model learns to stop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import DataError, LorakitError, UsageError
from lorakit.train.data import IGNORE_INDEX, Example, json_objects, read_text

TEMPLATE_FILE = "chat_template.jinja"  # what transformers' save_pretrained writes for a tokenizer

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# For models without a template (like the shipped GPT). The assistant's content and the eos token
# sit inside {% generation %} so transformers can report which characters the assistant wrote;
# eos ends the turn, so generation stops there. The newline after eos is formatting, not loss.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Conversation:
    """One record's messages ({"role", "content"} dicts) and where it came from ("file:line")."""

    messages: list[dict[str, str]]
    source: str


@dataclass
class EncodedExample:
    """A tokenized conversation: labels are the input ids where the loss applies, else IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    def to_example(self) -> Example:
        """The trainer's Example (the same ids and per-token labels)."""
        return Example(self.input_ids, self.labels)


# ---------------------------------------------------------------- reading conversation files


def read_conversations(path: str | Path) -> list[Conversation]:
    """The conversations of a JSON-lines file in the OpenAI, ShareGPT or prompt/completion
    format (detected from the first record). Raises DataError naming file:line for a bad record."""
    file = Path(path)
    records = list(_json_records(file))
    if not records:
        raise DataError(f"{file} holds no records: add one JSON object per line")
    first_line, first = records[0]
    parse = _format_of(first, f"{file}:{first_line}")
    return [Conversation(parse(record, f"{file}:{line}"), f"{file}:{line}") for line, record in records]


def _json_records(file: Path):
    """(line number, JSON object) for every non-blank line (train.data's JSON-lines reader)."""
    return json_objects(read_text(file), file, where="{file}:{line}")  # file:line, as the records' own errors


def _format_of(record: dict[str, Any], where: str):
    """The parser for the file's format, chosen by the first record's keys."""
    if "messages" in record:
        return _openai_messages
    if "conversations" in record:
        return _sharegpt_messages
    if "prompt" in record and "completion" in record:
        return _prompt_completion_messages
    raise DataError(
        f"{where}: unknown chat format (keys: {', '.join(record) or 'none'}); use 'messages' (OpenAI), "
        "'conversations' (ShareGPT) or 'prompt' and 'completion'"
    )


def _turns(record: dict[str, Any], key: str, where: str) -> list[Any]:
    turns = record.get(key)
    if key not in record:
        raise DataError(
            f"{where}: no {key!r} key, but the file's first record is in that format; use one format per file"
        )
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns, got {json.dumps(turns)[:60]}")
    return turns


def _openai_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = _turns(record, "messages", where)
    return _checked(
        [
            _turn(t, "role", "content", dict(zip(ROLES, ROLES, strict=True)), f"{where}, turn {i}")
            for i, t in enumerate(turns, start=1)
        ],
        where,
    )


def _sharegpt_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    turns = _turns(record, "conversations", where)
    return _checked(
        [_turn(t, "from", "value", SHAREGPT_ROLES, f"{where}, turn {i}") for i, t in enumerate(turns, start=1)], where
    )


def _prompt_completion_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    for key in ("prompt", "completion"):
        if key not in record:
            raise DataError(
                f"{where}: no {key!r} key, but the file's first record is prompt/completion; use one format per file"
            )
        if not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    return _checked(
        [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}], where
    )


def _turn(turn: Any, role_key: str, content_key: str, roles: dict[str, str], where: str) -> dict[str, str]:
    """One turn as {"role", "content"}; a DataError says what is wrong with it."""
    if not isinstance(turn, dict):
        raise DataError(f"{where}: a turn must be a JSON object with {role_key!r} and {content_key!r}")
    role = turn.get(role_key)
    if not isinstance(role, str) or role not in roles:
        raise DataError(f"{where}: unknown {role_key} {role!r}; use one of {', '.join(roles)}")
    if content_key not in turn:
        raise DataError(f"{where}: the {role} turn has no {content_key!r}; add the turn's text")
    content = turn[content_key]
    if not isinstance(content, str):
        raise DataError(
            f"{where}: {content_key!r} must be a string, got {type(content).__name__}; "
            "join multi-part content into one text"
        )
    return {"role": roles[role], "content": content}


def _checked(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    """Conversation-level rules: something to learn, and a prompt before the first answer."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn; add the answer the model should give")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with the assistant; start with a system or user turn")
    return messages


# ---------------------------------------------------------------- templates


def template_for(tokenizer: Any) -> str:
    """The tokenizer's own chat template, else DEFAULT_CHAT_TEMPLATE (which needs an eos token)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return own
    if getattr(tokenizer, "eos_token", None) is None:
        raise UsageError("the model's tokenizer has no chat template and no eos token to end turns; use a chat model")
    return DEFAULT_CHAT_TEMPLATE


def write_template(folder: str | Path, template: str) -> Path:
    """Store `template` as chat_template.jinja in `folder` (atomically); returns the file."""
    from lorakit.files.atomic import replace_file

    target = Path(folder) / TEMPLATE_FILE
    return replace_file(target, lambda tmp: tmp.write_text(template, encoding="utf-8"))


def read_template(folder: str | Path) -> str | None:
    """The chat template stored in `folder`, or None when it has none."""
    file = Path(folder) / TEMPLATE_FILE
    return file.read_text(encoding="utf-8") if file.is_file() else None


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], template: str) -> str:
    """The text a server feeds the model for a chat request: the messages and the assistant's header."""
    return _render(tokenizer, messages, template, add_generation_prompt=True)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], template: str, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as err:
        raise DataError(f"the chat template cannot render this conversation: {err}") from None


# ---------------------------------------------------------------- encoding with loss masks


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    template: str,
    max_length: int,
    train_on_prompt: bool = False,
) -> EncodedExample:
    """Token ids of the rendered conversation and their labels: IGNORE_INDEX except on the
    assistant turns' content and end-of-turn token (every token, with `train_on_prompt`).
    Cut to `max_length` tokens; `truncated` says whether anything was cut."""
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("chat training needs a fast (Rust) tokenizer: its offsets locate the assistant's tokens")
    if _GENERATION_TAG.search(template):
        ids, mask = _marked_assistant_tokens(tokenizer, messages, template)
    else:
        ids, mask = _incremental_assistant_tokens(tokenizer, messages, template)
    labels = list(ids) if train_on_prompt else [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return EncodedExample(list(ids[:max_length]), labels[:max_length], len(ids) > max_length)


def _marked_assistant_tokens(tokenizer: Any, messages: Sequence[dict[str, str]], template: str):
    """Template with {% generation %} markers: transformers maps the marked text to tokens."""
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(
            list(messages), chat_template=template, return_dict=True, return_assistant_tokens_mask=True
        )
    except TemplateError as err:
        raise DataError(f"the chat template cannot render this conversation: {err}") from None
    return list(out["input_ids"]), list(out["assistant_masks"])


def _incremental_assistant_tokens(tokenizer: Any, messages: Sequence[dict[str, str]], template: str):
    """Template without markers: each assistant turn is the text that rendering messages[:i+1]
    adds to rendering messages[:i] with the generation prompt, less trailing whitespace.
    Characters map to tokens through the offsets (a token touching a span counts), so no
    assumption is made about how tokens split at turn boundaries."""
    full = _render(tokenizer, messages, template, add_generation_prompt=False)
    spans = [
        _assistant_span(tokenizer, messages, template, i, full)
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(start < stop and begin < end for begin, stop in spans) for start, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def _assistant_span(tokenizer: Any, messages: Sequence[dict[str, str]], template: str, i: int, full: str):
    """(start, end) characters of assistant turn `i` in the rendered conversation `full`."""
    before = _render(tokenizer, messages[:i], template, add_generation_prompt=True)
    through = _render(tokenizer, messages[: i + 1], template, add_generation_prompt=False)
    if not (through.startswith(before) and full.startswith(through)):
        raise LorakitError(
            "the chat template does not render a conversation turn by turn (an earlier turn changes when one is "
            "added), so the assistant's tokens cannot be located; add {% generation %} markers to the template"
        )
    answer = through[len(before) :].rstrip()
    return len(before), len(before) + len(answer)


def encode_conversations(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    template: str,
    max_length: int,
    train_on_prompt: bool = False,
) -> tuple[list[Example], int]:
    """The trainer's examples for `conversations` and how many were truncated. A conversation
    whose assistant tokens were all cut off is dropped (it has nothing to learn); none left is a DataError."""
    examples, truncated = [], 0
    for conversation in conversations:
        try:
            encoded = encode_conversation(tokenizer, conversation.messages, template, max_length, train_on_prompt)
        except DataError as err:
            raise DataError(f"{conversation.source}: {err}") from None
        truncated += encoded.truncated
        example = encoded.to_example()
        if example.weight > 0:
            examples.append(example)
    if not examples:
        raise DataError(f"no conversation keeps an assistant token within --max-length {max_length}; raise it")
    return examples, truncated
