"""Batch input files for the benchmarks: valid JSONL of chat requests, written to disk.

Contents are plain English-like words (never one repeated character, which would make tiktoken
pathologically slow and measure the tokenizer instead of batchsvc), deterministic per seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over a lazy dog while batch workers keep every model server "
    "busy with requests that arrive in order and leave as results written to files for the "
    "client who polls until the status says completed then downloads both outputs at once"
).split()

#: Lines naming this model are not servable: batchsvc records them at once as error lines
#: (spec open point 26), so an error file exists to download.
MISSING_MODEL = "bench-missing-model"


def _paragraphs(seed: int, count: int, size: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words: list[str] = []
        length = 0
        while length < size:
            word = rng.choice(WORDS)
            words.append(word)
            length += len(word) + 1
        out.append(" ".join(words))
    return out


def _line(custom_id: str, model: str, content: str) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 64,
            },
        },
        separators=(",", ":"),
    )


def write_jsonl(
    path: Path,
    lines: int,
    model: str,
    *,
    line_bytes: int | None = None,
    error_every: int = 0,
    prefix: str = "req",
    seed: int = 6,
) -> int:
    """Write ``lines`` request lines for ``model``; returns the file's size in bytes.

    ``line_bytes``: pad each line (newline included) to exactly this size; ``None`` for short
    prompts. ``error_every``: every n-th line (n > 0) names :data:`MISSING_MODEL` instead.
    """
    pool = _paragraphs(seed, 64, (line_bytes or 200) + 64)
    size = 0
    with open(path, "w", encoding="ascii", newline="\n") as out:
        for index in range(lines):
            custom_id = f"{prefix}-{index:06d}"
            target = (
                MISSING_MODEL if error_every and index % error_every == error_every - 1 else model
            )
            if line_bytes is None:
                text = _line(custom_id, target, f"Say {custom_id}: " + pool[index % 64][:120])
            else:
                skeleton = _line(custom_id, target, "")
                room = line_bytes - len(skeleton) - 1
                if room < 1:
                    raise ValueError(f"line_bytes={line_bytes} is too small")
                text = _line(custom_id, target, pool[index % 64][:room].ljust(room, "."))
            out.write(text + "\n")
            size += len(text) + 1
    return size
