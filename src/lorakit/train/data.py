"""Training data: read JSONL / CSV / TSV tables and turn them into tokenized data sets.

Every problem with a file is a DataError naming the file and what to do (the byte offset of
bad UTF-8, the line of a malformed row, the columns there are when one is missing), so the
`lorakit` command reports it as one line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}
IGNORE_INDEX = -100  # label value the loss skips (padding, prompt tokens)


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a JSONL, CSV or TSV file (by suffix; `.json` is read as JSON lines, `.txt` as
    TSV), every value as a string. Raises DataError for a missing, empty, non-UTF-8 or
    malformed file."""
    file = Path(path)
    kind = SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise DataError(f"{file}: unknown data format {file.suffix!r}; use one of {', '.join(SUFFIXES)}")
    text = read_text(file)
    if not text.strip():
        raise DataError(f"{file} is empty: it needs a header (CSV/TSV) or JSON lines with data")
    rows = _read_jsonl(text, file) if kind == "jsonl" else _read_delimited(text, file, "," if kind == "csv" else "\t")
    if not rows:
        raise DataError(f"{file} holds no data rows (only a header?): add examples")
    return rows


def read_text(file: Path) -> str:
    """A data file's text; DataError when it is missing or not UTF-8."""
    if not file.is_file():
        raise DataError(f"{file} does not exist: check the path")
    try:
        return file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{file} is not UTF-8 text (bad byte at offset {err.start}): re-save it as UTF-8") from None


def json_objects(text: str, file: Path, where: str = "{file}, line {line}") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for every non-blank line of a JSON-lines text; DataError
    naming the line (`where`: how the message spells the place) for one that is not an object."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        place = where.format(file=file, line=number)
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{place}: not valid JSON ({err.msg}); one JSON object per line") from None
        if not isinstance(item, dict):
            raise DataError(f"{place}: expected a JSON object, got {type(item).__name__}")
        yield number, item


def _read_jsonl(text: str, file: Path) -> list[dict[str, str]]:
    return [{str(k): _as_text(v) for k, v in item.items()} for _, item in json_objects(text, file)]


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # JSON true/false as labels read like the CSV spelling
        return str(value).lower()
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _read_delimited(text: str, file: Path, delimiter: str) -> list[dict[str, str]]:
    # TSV data (like SST-2) contains quote characters as text, so TSV is read without quoting.
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as err:
        raise DataError(f"{file}, line 1: cannot read the header ({err})") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise DataError(f"{file}, line 1: the header is empty; the first line must name the columns")
    rows = []
    try:
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{file}, line {reader.line_num}: {len(fields)} fields but the header has {len(header)} "
                    f"({', '.join(header)}); check the delimiter and quoting"
                )
            rows.append(dict(zip(header, fields, strict=True)))
    except csv.Error as err:
        raise DataError(f"{file}, line {reader.line_num}: malformed row ({err})") from None
    return rows


def find_column(rows: list[dict[str, str]], wanted: str, fallbacks: Sequence[str] = (), path: str | Path = "") -> str:
    """The column to read: `wanted` if present, else the first fallback present; else a
    DataError listing the columns there are."""
    columns = list(rows[0]) if rows else []
    for name in (wanted, *fallbacks):
        if name in columns:
            return name
    tried = " or ".join(repr(n) for n in (wanted, *fallbacks))
    raise DataError(f"{path or 'data'}: no column {tried}; columns are: {', '.join(columns) or 'none'}")


def label_order(values: Sequence[str]) -> list[str]:
    """Distinct labels in a stable order: numerically when all are integers, else sorted."""
    distinct = set(values)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


@dataclass
class Example:
    """One tokenized example: input ids, and the label id (classify) or per-token labels (causal LM)."""

    input_ids: list[int]
    label: int | list[int]

    @property
    def weight(self) -> int:
        """How many loss terms the example adds: 1, or the causal LM's predicted tokens."""
        if isinstance(self.label, int):
            return 1
        return sum(1 for t in self.label[1:] if t != IGNORE_INDEX)


@dataclass
class ClassificationData:
    """Labelled texts, tokenized. `labels` is the label set (index = id)."""

    examples: list[Example]
    labels: list[str]
    texts: list[str] = field(default_factory=list)
    task: str = "classify"

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def label2id(self) -> dict[str, int]:
        """Label name -> id."""
        return {name: i for i, name in enumerate(self.labels)}

    @classmethod
    def from_rows(
        cls,
        rows: list[dict[str, str]],
        tokenizer: Any,
        *,
        text_column: str = "text",
        label_column: str = "label",
        labels: list[str] | None = None,
        max_length: int = 256,
        path: str | Path = "",
    ) -> ClassificationData:
        """Tokenize `rows`. With `labels` given (an adapter's head), a label outside it is a DataError."""
        text_col = find_column(rows, text_column, _text_fallbacks(text_column), path)
        label_col = find_column(rows, label_column, (), path)
        values = [r[label_col].strip() for r in rows]
        if labels is None:
            labels = label_order(values)
            if len(labels) < 2:
                raise DataError(f"{path or 'data'}: column {label_col!r} has one label ({labels[0]!r}); need 2 or more")
        ids = {name: i for i, name in enumerate(labels)}
        unknown = sorted({v for v in values if v not in ids})
        if unknown:
            shown = ", ".join(repr(v) for v in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(
                f"{path or 'data'}: labels {shown} are not in the model's label set ({', '.join(labels)}); "
                "fix the data or train an adapter on these labels"
            )
        texts = [r[text_col] for r in rows]
        encoded = _encode(tokenizer, texts, max_length)
        examples = [Example(e, ids[v]) for e, v in zip(encoded, values, strict=True)]
        return cls(examples, list(labels), texts)


@dataclass
class CausalLMData:
    """Texts (loss on every token), prompt/completion pairs (loss on the completion only) or
    conversations (lorakit.train.chat: loss on the assistant's turns), tokenized.
    `truncated` counts the examples cut to max_length; `chat_template` is the template
    conversations were rendered with (None for texts and prompt/completion columns)."""

    examples: list[Example]
    task: str = "causal-lm"
    truncated: int = 0
    chat_template: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @classmethod
    def from_rows(
        cls,
        rows: list[dict[str, str]],
        tokenizer: Any,
        *,
        text_column: str = "text",
        prompt_column: str | None = None,
        completion_column: str | None = None,
        max_length: int = 256,
        path: str | Path = "",
    ) -> CausalLMData:
        """Tokenize `rows`; with prompt and completion columns the prompt tokens get no loss."""
        if prompt_column or completion_column:
            p_col = find_column(rows, prompt_column or "prompt", (), path)
            c_col = find_column(rows, completion_column or "completion", (), path)
            examples, truncated = _prompt_completion_examples(
                tokenizer, [r[p_col] for r in rows], [r[c_col] for r in rows], max_length
            )
        else:
            col = find_column(rows, text_column, _text_fallbacks(text_column), path)
            examples, truncated = _text_examples(tokenizer, [r[col] for r in rows], max_length)
        examples = [e for e in examples if e.weight > 0]
        if not examples:
            raise DataError(f"{path or 'data'}: no example has a token to predict (all texts or completions empty)")
        return cls(examples, truncated=truncated)


def _prompt_completion_examples(
    tokenizer: Any, prompts: list[str], completions: list[str], max_length: int
) -> tuple[list[Example], int]:
    """Prompt + completion + eos, labels on the completion and eos; how many were cut."""
    eos = getattr(tokenizer, "eos_token_id", None)
    end = [eos] if eos is not None else []
    full = [
        len(p) + len(c) + len(end)
        for p, c in zip(
            _untruncated_ids(tokenizer, prompts), _untruncated_ids(tokenizer, completions, False), strict=True
        )
    ]
    examples = []
    for p, c in zip(
        _encode(tokenizer, prompts, max_length), _encode(tokenizer, completions, max_length, False), strict=True
    ):
        c = c + end
        examples.append(Example((p + c)[:max_length], ([IGNORE_INDEX] * len(p) + c)[:max_length]))
    return examples, sum(n > max_length for n in full)


def _text_examples(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[Example], int]:
    """Texts with an eos appended where there is room, labels on every token; how many were cut."""
    eos = getattr(tokenizer, "eos_token_id", None)
    examples = []
    for ids in _encode(tokenizer, texts, max_length):
        if eos is not None and (not ids or ids[-1] != eos) and len(ids) < max_length:
            ids = ids + [eos]  # the model learns where a text ends
        examples.append(Example(ids, list(ids)))
    return examples, sum(len(ids) > max_length for ids in _untruncated_ids(tokenizer, texts))


def _untruncated_ids(tokenizer: Any, texts: list[str], special: bool = True) -> list[list[int]]:
    """Token ids without truncation: only to count which examples max_length cuts."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "longer than the maximum" is the point here
    try:
        return tokenizer(texts, add_special_tokens=special)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)


def _text_fallbacks(text_column: str) -> tuple[str, ...]:
    # Only the default name falls back (SST-2 style files say "sentence"); a column the user
    # named must exist, or the error lists the columns there are.
    return ("sentence",) if text_column == "text" else ()


def _encode(tokenizer: Any, texts: list[str], max_length: int, special: bool = True) -> list[list[int]]:
    # Tokenized once, unpadded: batches are padded to their own longest example later.
    out = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=special)
    return [list(ids) for ids in out["input_ids"]]


def split_rows(rows: list[dict[str, str]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows: a seeded random `fraction` of the rows held out for evaluation."""
    import random

    if not 0.0 < fraction < 1.0:
        raise DataError(f"--eval-split {fraction}: must be between 0 and 1 (e.g. 0.1)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DataError(f"--eval-split {fraction} leaves no training rows out of {len(rows)}; use a smaller split")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
