"""Chat data (lorakit.train.chat): conversation formats, malformed records, templates, loss masks.

The label masks are checked token by token against references built here from separately
tokenized pieces of the conversation (prompt text, assistant content, eos), not from the code's
own span logic.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lorakit.defaults import default_causal_lm_path, offline
from lorakit.errors import DataError, LorakitError
from lorakit.train import chat
from lorakit.train.data import IGNORE_INDEX

SYSTEM, USER1, ANSWER1, USER2, ANSWER2 = "Be brief.", "hi there", "Hello!", "what is 2+2?", "It is 4."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER1},
    {"role": "assistant", "content": ANSWER1},
    {"role": "user", "content": USER2},
    {"role": "assistant", "content": ANSWER2},
]
# A ChatML-style template without {% generation %} markers: the turn-by-turn path locates answers.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    offline()
    return AutoTokenizer.from_pretrained(default_causal_lm_path())


def _write(tmp_path, records, name="chat.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats


def test_openai_and_sharegpt_files_read_to_the_same_messages(tmp_path):
    sharegpt_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    openai = _write(tmp_path, [{"messages": CONVERSATION}], "openai.jsonl")
    sharegpt = _write(
        tmp_path,
        [{"conversations": [{"from": sharegpt_roles[m["role"]], "value": m["content"]} for m in CONVERSATION]}],
        "sharegpt.jsonl",
    )
    assert [c.messages for c in chat.read_conversations(openai)] == [CONVERSATION]
    assert [c.messages for c in chat.read_conversations(sharegpt)] == [CONVERSATION]


def test_sharegpt_accepts_user_and_assistant_spellings(tmp_path):
    path = _write(tmp_path, [{"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}])
    assert chat.read_conversations(path)[0].messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_prompt_completion_reads_as_one_user_and_one_assistant_turn(tmp_path):
    path = _write(tmp_path, [{"prompt": USER1, "completion": ANSWER1}, {"prompt": USER2, "completion": ANSWER2}])
    conversations = chat.read_conversations(path)
    assert [c.messages for c in conversations] == [CONVERSATION[1:3], CONVERSATION[3:5]]
    assert [c.source for c in conversations] == [f"{path}:1", f"{path}:2"]


def test_sources_count_blank_lines(tmp_path):
    path = _write(tmp_path, [{"messages": CONVERSATION[1:3]}, "", "   ", {"messages": CONVERSATION[3:5]}])
    assert [c.source for c in chat.read_conversations(path)] == [f"{path}:1", f"{path}:4"]


GOOD = {"messages": CONVERSATION[1:3]}
MALFORMED = [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "has no 'content'"),
    (
        {"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "a"}]},
        "must be a string",
    ),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hello"}, "non-empty list"),
    ({"messages": ["hello"]}, "must be a JSON object"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "starts with the assistant"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no 'messages' key"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
]


@pytest.mark.parametrize(("record", "message"), MALFORMED)
def test_malformed_record_names_its_line_and_the_problem(tmp_path, record, message):
    path = _write(tmp_path, [GOOD, "", record])
    with pytest.raises(DataError) as err:
        chat.read_conversations(path)
    assert f"{path}:3" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown from 'bot'"),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "must be a string"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
    ],
)
def test_malformed_sharegpt_turn_names_its_line(tmp_path, record, message):
    path = _write(
        tmp_path, [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, record]
    )
    with pytest.raises(DataError, match=f"{path}:2, turn 1: .*{message}|{path}:2: .*{message}"):
        chat.read_conversations(path)


def test_prompt_completion_with_a_non_string_names_its_line(tmp_path):
    path = _write(tmp_path, [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": 5}])
    with pytest.raises(DataError, match=f"{path}:2: 'completion' must be a string"):
        chat.read_conversations(path)


def test_unknown_format_and_empty_file(tmp_path):
    with pytest.raises(DataError, match=":1: unknown chat format .*keys: text"):
        chat.read_conversations(_write(tmp_path, [{"text": "hi"}]))
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no records"):
        chat.read_conversations(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- label masks against hand-built references


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference(tokenizer, pieces):
    """(ids, labels) from (text, learned) pieces tokenized one by one; the eos piece is an id."""
    ids, labels = [], []
    for text, learned in pieces:
        piece = [text] if isinstance(text, int) else _ids(tokenizer, text)
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    return ids, labels


def test_default_template_masks_all_but_answers_and_their_eos(tokenizer):
    eos = tokenizer.eos_token_id
    ids, labels = _reference(
        tokenizer,
        [
            (f"<|system|>\n{SYSTEM}\n<|user|>\n{USER1}\n<|assistant|>\n", False),
            (ANSWER1, True),
            (eos, True),
            (f"\n<|user|>\n{USER2}\n<|assistant|>\n", False),
            (ANSWER2, True),
            (eos, True),
            ("\n", False),
        ],
    )
    encoded = chat.encode_conversation(tokenizer, CONVERSATION, chat.template_for(tokenizer), max_length=128)
    assert encoded.input_ids == ids
    assert encoded.labels == labels
    assert not encoded.truncated


def test_template_without_markers_masks_all_but_answers_and_their_end_of_turn(tokenizer):
    ids, labels = _reference(
        tokenizer,
        [
            (
                f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER1}<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            (f"{ANSWER1}<|im_end|>", True),
            (f"\n<|im_start|>user\n{USER2}<|im_end|>\n<|im_start|>assistant\n", False),
            (f"{ANSWER2}<|im_end|>", True),
            ("\n", False),
        ],
    )
    encoded = chat.encode_conversation(tokenizer, CONVERSATION, CHATML, max_length=128)
    assert encoded.input_ids == ids
    assert encoded.labels == labels


def test_markers_and_turn_by_turn_rendering_find_the_same_tokens(tokenizer):
    unmarked = chat.DEFAULT_CHAT_TEMPLATE.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert "{%- generation" not in unmarked
    marked = chat.encode_conversation(tokenizer, CONVERSATION, chat.DEFAULT_CHAT_TEMPLATE, 128)
    assert chat.encode_conversation(tokenizer, CONVERSATION, unmarked, 128) == marked


def test_train_on_prompt_learns_every_token(tokenizer):
    encoded = chat.encode_conversation(tokenizer, CONVERSATION, CHATML, 128, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    last_is_marked = "{%- for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{%- endfor %}"
    with pytest.raises(LorakitError, match="turn by turn"):
        chat.encode_conversation(tokenizer, CONVERSATION, last_is_marked, 128)


def test_truncation_is_reported_and_keeps_the_leading_tokens(tokenizer):
    template = chat.template_for(tokenizer)
    full = chat.encode_conversation(tokenizer, CONVERSATION, template, 128)
    cut = chat.encode_conversation(tokenizer, CONVERSATION, template, 40)
    assert cut.truncated and len(cut.input_ids) == 40
    assert (cut.input_ids, cut.labels) == (full.input_ids[:40], full.labels[:40])
    exact = chat.encode_conversation(tokenizer, CONVERSATION, template, len(full.input_ids))
    assert not exact.truncated


def test_encode_conversations_counts_truncated_and_drops_those_with_nothing_left(tokenizer):
    template = chat.template_for(tokenizer)
    short = chat.Conversation(CONVERSATION[1:3], "f:1")
    long = chat.Conversation([{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "a"}], "f:2")
    examples, truncated = chat.encode_conversations(tokenizer, [short, long], template, max_length=40)
    assert truncated == 1 and len(examples) == 1
    assert examples[0].input_ids == chat.encode_conversation(tokenizer, short.messages, template, 40).input_ids
    with pytest.raises(DataError, match="--max-length 40"):
        chat.encode_conversations(tokenizer, [long], template, max_length=40)


# ---------------------------------------------------------------- templates and prompts


def test_default_template_ends_each_answer_with_eos(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=chat.template_for(tokenizer), tokenize=False)
    assert text.count(f"{tokenizer.eos_token}\n") == 2
    assert f"{ANSWER1}{tokenizer.eos_token}" in text and f"{ANSWER2}{tokenizer.eos_token}" in text


def test_render_prompt_is_the_conversation_so_far_plus_the_assistant_header(tokenizer):
    template = chat.template_for(tokenizer)
    prompt = chat.render_prompt(tokenizer, CONVERSATION[:4], template)
    full = tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    assert prompt.endswith("<|assistant|>\n")
    assert full.startswith(prompt) and full[len(prompt) :].startswith(ANSWER2)


def test_template_for_prefers_the_tokenizer_own(tokenizer):
    assert tokenizer.chat_template is None
    assert chat.template_for(tokenizer) == chat.DEFAULT_CHAT_TEMPLATE
    own = AutoTokenizer.from_pretrained(default_causal_lm_path())
    own.chat_template = CHATML
    assert chat.template_for(own) == CHATML


def test_template_round_trip_through_an_adapter_folder(tmp_path):
    assert chat.read_template(tmp_path) is None
    written = chat.write_template(tmp_path, CHATML)
    assert written == tmp_path / "chat_template.jinja"
    assert chat.read_template(tmp_path) == CHATML


def test_template_file_is_the_one_transformers_loads(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    chat.write_template(tmp_path, chat.DEFAULT_CHAT_TEMPLATE)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == chat.DEFAULT_CHAT_TEMPLATE
