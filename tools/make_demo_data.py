"""Write lorakit's built-in demo data set: src/lorakit/data/demo/{train,test}.jsonl.

Run `python tools/make_demo_data.py` after editing tools/demo_sentences.py. The split is
stratified (the same 80/20 share of every topic) and fixed by the seed, so the files only
change when the sentences do.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo_sentences import TOPICS  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "data" / "demo"
TEST_SHARE = 0.2


def split(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) rows: per topic a seeded shuffle, the last TEST_SHARE held out; then both shuffled."""
    rng = random.Random(seed)
    train, test = [], []
    for label, sentences in TOPICS.items():
        rows = [{"text": s, "label": label} for s in sentences]
        rng.shuffle(rows)
        cut = len(rows) - round(len(rows) * TEST_SHARE)
        train += rows[:cut]
        test += rows[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def main() -> None:
    """Write both files (UTF-8 JSONL, one {"text", "label"} object per line)."""
    every = [s for sentences in TOPICS.values() for s in sentences]
    duplicates = {s for s in every if every.count(s) > 1}
    if duplicates:
        raise SystemExit(f"duplicate sentences: {sorted(duplicates)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "test"), split(), strict=True):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (OUT / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{OUT / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
