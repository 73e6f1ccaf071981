"""Input-token counting and the per-model token limit (DESIGN "Per-model token limits", spec 8.3).

Pure domain code: no Flask, no Celery.

Encodings
    ``cl100k_base`` and ``o200k_base`` are built from tiktoken's own definitions
    (``tiktoken_ext.openai_public``: pattern, special tokens, expected sha256) but their BPE ranks
    are read from the files shipped in ``batchsvc/encodings/``, named like tiktoken's cache
    (``sha1(<blob URL>)``). Nothing is downloaded, and neither ``TIKTOKEN_CACHE_DIR`` nor
    tiktoken's temp-dir cache is read or written: ``tiktoken.load.load_tiktoken_bpe`` always goes
    through ``read_file_cached`` (which consults those env vars, copies the file into the cache
    dir and raises if a configured cache dir is read-only), so the file is read with
    ``tiktoken.load.read_file`` and verified with ``tiktoken.load.check_hash`` against the hash
    tiktoken's definition passes, then parsed exactly like ``load_tiktoken_bpe`` does. A file that
    does not match is refused (no re-download).

Counting (the OpenAI cookbook way)
    ``3`` per message + the encoded ``role`` + the encoded ``name`` (``+1`` when a name is present)
    + the encoded text content, plus ``3`` for the reply primer. Text is encoded with
    ``encode_ordinary``, so text that looks like a special token (``<|endoftext|>``) is counted as
    plain text instead of raising. Content may be a string, or a list of parts where only parts
    with ``type == "text"`` count their ``text`` (images and other parts count 0); ``None`` or a
    missing content counts 0. Tool calls of an assistant message (and the legacy
    ``function_call``) are counted as the compact JSON text ``{"name":...,"arguments":...}`` of
    each call's function: OpenAI does not document how it counts them, and since ``arguments`` is
    itself a JSON string the escaping makes this a slight over-estimate, the safe side for a
    limit. ``tool_call_id`` is not counted (the cookbook does not). Malformed values never raise:
    a message that is not a dict costs only the 3-token overhead, a non-string role/name/text
    costs 0 (the backend decides what is valid).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from batchsvc.errors import ContextLengthExceeded

ENCODINGS = ("cl100k_base", "o200k_base")

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMER_TOKENS = 3

#: Roles that truncation never drops (it cuts their text only as a last resort).
KEPT_ROLES = frozenset({"system", "developer"})

ENCODINGS_DIR = Path(__file__).resolve().parent / "encodings"


def bpe_file_name(blobpath: str) -> str:
    """The name tiktoken's cache gives the blob at ``blobpath`` (sha1 of the URL)."""
    return hashlib.sha1(blobpath.encode(), usedforsecurity=False).hexdigest()


def _load_packaged_bpe(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stand-in for ``load_tiktoken_bpe``: read the packaged copy of ``blobpath``, never the net."""
    path = ENCODINGS_DIR / bpe_file_name(blobpath)
    if not path.is_file():
        raise RuntimeError(f"tokenizer file for {blobpath} is not packaged (expected {path})")
    if not expected_hash:
        raise RuntimeError(f"tiktoken gives no expected hash for {blobpath}; refusing to load it")
    data = tiktoken.load.read_file(str(path))
    if not tiktoken.load.check_hash(data, expected_hash):
        raise ValueError(f"tokenizer file {path} does not match sha256 {expected_hash}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():  # the format load_tiktoken_bpe parses: "<base64> <rank>"
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken ``Encoding`` ``name`` (``cl100k_base`` or ``o200k_base``), loaded offline.

    tiktoken's own constructor runs with its ``load_tiktoken_bpe`` global bound to the packaged
    loader (a copy of the function with different globals: tiktoken's module is not touched).
    """
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {', '.join(ENCODINGS)}")
    constructor = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]
    loaded: list[dict[bytes, int]] = []

    def loader(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        ranks = _load_packaged_bpe(blobpath, expected_hash)
        loaded.append(ranks)
        return ranks

    offline: Callable[[], dict[str, Any]] = types.FunctionType(
        constructor.__code__,
        {**constructor.__globals__, "load_tiktoken_bpe": loader},
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    params = offline()
    if not loaded or params.get("mergeable_ranks") is not loaded[-1]:
        raise RuntimeError(f"tiktoken's {name} definition did not load through the packaged file")
    return tiktoken.Encoding(**params)


def _encode(text: str, encoding: str) -> list[int]:
    return get_encoding(encoding).encode_ordinary(text)


def count_text_tokens(text: str, encoding: str) -> int:
    """Tokens of ``text`` (special-token look-alikes count as plain text)."""
    return len(_encode(text, encoding))


def _str_tokens(value: Any, encoding: str) -> int:
    return count_text_tokens(value, encoding) if isinstance(value, str) else 0


def _content_tokens(content: Any, encoding: str) -> int:
    if isinstance(content, str):
        return count_text_tokens(content, encoding)
    if isinstance(content, list):
        return sum(
            count_text_tokens(part["text"], encoding) for part in content if _is_text_part(part)
        )
    return 0


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _function_json(function: Any) -> str | None:
    if not isinstance(function, dict):
        return None
    shown = {key: function[key] for key in ("name", "arguments") if key in function}
    return json.dumps(shown, ensure_ascii=False, separators=(",", ":"), default=str)


def _tool_call_tokens(message: dict[str, Any], encoding: str) -> int:
    texts: list[str] = []
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            text = _function_json(call.get("function")) if isinstance(call, dict) else None
            if text is not None:
                texts.append(text)
    legacy = _function_json(message.get("function_call"))
    if legacy is not None:
        texts.append(legacy)
    return sum(count_text_tokens(text, encoding) for text in texts)


def _fixed_tokens(message: Any, encoding: str) -> int:
    """A message's tokens other than its content: overhead, role, name, tool calls."""
    if not isinstance(message, dict):
        return TOKENS_PER_MESSAGE
    tokens = TOKENS_PER_MESSAGE + _str_tokens(message.get("role"), encoding)
    name = message.get("name")
    if isinstance(name, str):
        tokens += count_text_tokens(name, encoding) + TOKENS_PER_NAME
    return tokens + _tool_call_tokens(message, encoding)


def count_message_tokens(message: Any, encoding: str) -> int:
    """One message's share of :func:`count_chat_tokens` (without the reply primer)."""
    content = message.get("content") if isinstance(message, dict) else None
    return _fixed_tokens(message, encoding) + _content_tokens(content, encoding)


def count_chat_tokens(messages: object, encoding: str) -> int:
    """Prompt tokens of a chat ``messages`` array, the OpenAI cookbook way (see module doc).
    Anything but a list (a body's ``messages`` is whatever the client sent) counts as no
    message."""
    if not isinstance(messages, list):
        return REPLY_PRIMER_TOKENS
    return REPLY_PRIMER_TOKENS + sum(count_message_tokens(m, encoding) for m in messages)


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _has_tool_calls(message: Any) -> bool:
    tool_calls = message.get("tool_calls") if isinstance(message, dict) else None
    return isinstance(tool_calls, list) and bool(tool_calls)


def _droppable_units(messages: list[Any], keep: set[int]) -> list[list[int]]:
    """Indexes of the messages truncation may drop, grouped in units, oldest first.

    An assistant message with ``tool_calls`` and the ``tool`` messages right after it (its
    answers) form one unit; every other message is a unit of its own.
    """
    units: list[list[int]] = []
    i = 0
    while i < len(messages):
        if i in keep:
            i += 1
            continue
        unit = [i]
        if _role(messages[i]) == "assistant" and _has_tool_calls(messages[i]):
            j = i + 1
            while j < len(messages) and j not in keep and _role(messages[j]) == "tool":
                unit.append(j)
                j += 1
        units.append(unit)
        i = unit[-1] + 1
    return units


def _suffix_within(text: str, budget: int, encoding: str) -> tuple[str, int]:
    """The longest token-suffix of ``text`` that re-encodes to at most ``budget`` tokens.

    A decoded suffix may re-encode to a slightly different count (merges across the cut,
    a split UTF-8 sequence), so shrink until it fits. Returns (text, its token count).
    """
    enc = get_encoding(encoding)
    tokens = enc.encode_ordinary(text)
    if len(tokens) <= budget:
        return text, len(tokens)
    keep = max(budget, 0)
    while keep > 0:
        # errors="ignore" drops the bytes of a character split by the cut.
        suffix = enc.decode_bytes(tokens[-keep:]).decode("utf-8", errors="ignore")
        count = len(enc.encode_ordinary(suffix))
        if count <= budget:
            return suffix, count
        keep -= max(count - budget, 1)
    return "", 0


def _cut_content(content: Any, budget: int, encoding: str) -> Any:
    """``content`` cut from its start so its text costs at most ``budget`` tokens."""
    if isinstance(content, str):
        return _suffix_within(content, budget, encoding)[0]
    if not isinstance(content, list):
        return content
    counts = [
        count_text_tokens(part["text"], encoding) if _is_text_part(part) else 0 for part in content
    ]
    excess = sum(counts) - budget
    parts: list[Any] = []
    for part, count in zip(content, counts, strict=True):
        if excess <= 0 or not _is_text_part(part):
            parts.append(part)
        elif count <= excess:
            excess -= count  # the whole (oldest) text part goes
        else:
            text, new_count = _suffix_within(part["text"], count - excess, encoding)
            parts.append({**part, "text": text})
            excess -= count - new_count
    return parts


def _cut_message(
    message: dict[str, Any], content_tokens: int, excess: int, encoding: str
) -> tuple[dict[str, Any], int]:
    """A copy of ``message`` whose text is ``excess`` tokens shorter, cut from its start (all of
    it when it has fewer), and the copy's :func:`count_message_tokens`."""
    budget = content_tokens - excess
    cut = {**message, "content": _cut_content(message.get("content"), budget, encoding)}
    return cut, count_message_tokens(cut, encoding)


#: ``messages`` that is not a list (a body holds whatever the client sent) comes back as it is.
_NotAList = TypeVar("_NotAList")


@overload
def apply_token_limit(
    messages: list[Any], max_tokens: int, error_on_max_token: bool, encoding: str
) -> tuple[list[Any], int]: ...


@overload
def apply_token_limit(
    messages: _NotAList, max_tokens: int, error_on_max_token: bool, encoding: str
) -> tuple[_NotAList, int]: ...


def apply_token_limit(
    messages: object,
    max_tokens: int,
    error_on_max_token: bool,
    encoding: str,
) -> tuple[object, int]:
    """Fit ``messages`` into ``max_tokens`` input tokens (spec 8.3).

    Returns ``(messages to send, their count_chat_tokens)``. Within the limit: unchanged (a new
    list holding the same message objects). Over it with ``error_on_max_token``: raise
    :class:`ContextLengthExceeded` with the full count. Otherwise truncate silently, each step
    only while the messages are still over the limit:

    1. drop whole turns, oldest first: any message but the system and developer messages and
       the last user message (an assistant message with tool calls goes together with the tool
       messages answering it);
    2. cut the last user message's text from its start, keeping its end (list content: text
       parts from the oldest on; a text part cut away entirely is removed, other parts stay);
    3. cut the system and developer messages' text from the start of the oldest one on, the
       same way (a message emptied stays, with ``""``);
    4. if even the fixed per-message overhead of what is left (overhead, role, name, tool calls,
       reply primer) exceeds the limit, raise :class:`ContextLengthExceeded`, before any of the
       above.

    The input list and dicts are never mutated; every message encodes once (plus a few encodes
    of the cut text). Anything but a list counts as no message: it comes back as it is (or
    raises :class:`ContextLengthExceeded` if even the reply primer is over the limit).
    """
    if not isinstance(messages, list):
        total = count_chat_tokens(messages, encoding)
        if total > max_tokens:
            raise ContextLengthExceeded(total, max_tokens)
        return messages, total

    fixed = [_fixed_tokens(m, encoding) for m in messages]
    contents = [
        _content_tokens(m.get("content"), encoding) if isinstance(m, dict) else 0 for m in messages
    ]
    costs = [f + c for f, c in zip(fixed, contents, strict=True)]
    total = REPLY_PRIMER_TOKENS + sum(costs)
    if total <= max_tokens:
        return list(messages), total
    if error_on_max_token:
        raise ContextLengthExceeded(total, max_tokens)

    pinned = [i for i, m in enumerate(messages) if _role(m) in KEPT_ROLES]  # oldest first
    last_user = next(
        (i for i in range(len(messages) - 1, -1, -1) if _role(messages[i]) == "user"), None
    )
    keep = set(pinned) if last_user is None else {*pinned, last_user}
    # Step 4 first: with every kept text cut away, only this is left.
    if REPLY_PRIMER_TOKENS + sum(fixed[i] for i in keep) > max_tokens:
        raise ContextLengthExceeded(total, max_tokens)

    dropped: set[int] = set()
    current = total
    for unit in _droppable_units(messages, keep):  # step 1
        if current <= max_tokens:
            break
        dropped.update(unit)
        current -= sum(costs[i] for i in unit)

    result = list(messages)
    cut_order = pinned if last_user is None else [last_user, *pinned]  # steps 2 and 3
    for i in cut_order:
        if current <= max_tokens:
            break
        result[i], cost = _cut_message(messages[i], contents[i], current - max_tokens, encoding)
        current += cost - costs[i]
    if current > max_tokens:  # unreachable after the step 4 check; never send an over-limit body
        raise ContextLengthExceeded(total, max_tokens)
    return [m for i, m in enumerate(result) if i not in dropped], current
