"""Build the shipped chat example's conversations from real SST-2 text (OpenAI fine-tuning format).

    python tools/make_chat_data.py --out runs/chat-data     # writes train.jsonl and dev.jsonl

Each conversation asks for the opening of a positive or a negative movie review and answers
with the first words of a real SST-2 sentence of that sentiment, so the adapter learns to
follow the request's sentiment. Requests are lower-cased like the shipped GPT's training text
(SST-2 as GLUE ships it). One in four conversations has a system prompt; one in five has a
second exchange ("another one"), so multi-turn masking is exercised. Train conversations come
from train.tsv (sentences of 6 to 30 words), dev ones from dev.tsv, so the held-out loss is on
sentences the model never saw. ../shared/data/sst2 is read, never copied into the repository.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2"
SIDES = {1: "positive", 0: "negative"}
ASKS = [
    "write the opening of a {side} movie review .",
    "give me a {side} review opening .",
    "start a {side} review of a film .",
    "i need the first line of a {side} movie review .",
    "how would a {side} review begin ?",
]
AGAIN = ["another one .", "give me another .", "one more , please ."]
SYSTEM = "you write short openings of movie reviews ."


def read_sentences(path: Path, min_words: int = 6, max_words: int = 30) -> dict[int, list[str]]:
    """SST-2 sentences by label, those with min_words..max_words words, deduplicated, in file order."""
    by_label: dict[int, list[str]] = {0: [], 1: []}
    seen = set()
    with open(path, encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            text, label = line.rstrip("\n").rsplit("\t", 1)
            text = " ".join(text.split())
            if min_words <= len(text.split()) <= max_words and text not in seen:
                seen.add(text)
                by_label[int(label)].append(text)
    return by_label


def opening(sentence: str, words: int = 12) -> str:
    """The first `words` words of a sentence: an opening, not the whole review."""
    return " ".join(sentence.split()[:words])


def conversation(rng: random.Random, label: int, answers: list[str]) -> dict:
    """One record: optional system prompt, a request for `label`'s sentiment, the answer(s)."""
    side = SIDES[label]
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
    messages += [
        {"role": "user", "content": rng.choice(ASKS).format(side=side)},
        {"role": "assistant", "content": opening(answers[0])},
    ]
    if len(answers) > 1:
        messages += [
            {"role": "user", "content": rng.choice(AGAIN)},
            {"role": "assistant", "content": opening(answers[1])},
        ]
    return {"messages": messages}


def build(sentences: dict[int, list[str]], count: int, seed: int) -> list[dict]:
    """`count` conversations, half positive and half negative, sentences drawn without replacement."""
    rng = random.Random(seed)
    pools = {label: rng.sample(items, len(items)) for label, items in sentences.items()}
    records = []
    for i in range(count):
        label = i % 2
        take = 2 if rng.random() < 0.2 and len(pools[label]) > 1 else 1
        if len(pools[label]) < take:
            break
        answers = [pools[label].pop() for _ in range(take)]
        records.append(conversation(rng, label, answers))
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with SST-2's train.tsv and dev.tsv")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "chat-data")
    parser.add_argument("--train", type=int, default=4000, help="train conversations (default 4000)")
    parser.add_argument("--dev", type=int, default=400, help="held-out conversations (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = build(read_sentences(args.data / "train.tsv"), args.train, args.seed)
    dev = build(read_sentences(args.data / "dev.tsv"), args.dev, args.seed + 1)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "dev.jsonl", dev)
    print(f"wrote {len(train)} train and {len(dev)} dev conversations to {args.out}")


if __name__ == "__main__":
    main()
