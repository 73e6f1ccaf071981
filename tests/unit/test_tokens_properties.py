"""Property tests of batchsvc.tokens.apply_token_limit (issue 16, README "Over-long input").

For random conversations and limits: with ``error_on_max_token`` false the result fits, its
count is a fresh count, the system and developer messages survive (untouched whenever they fit
alone), the last user message keeps its end, whole older turns go oldest first, and only a
fixed per-message overhead over the limit fails; with it true, over the limit fails and under
it nothing changes.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchsvc.errors import ContextLengthExceeded
from batchsvc.tokens import (
    ENCODINGS,
    REPLY_PRIMER_TOKENS,
    apply_token_limit,
    count_chat_tokens,
    count_message_tokens,
)

SETTINGS = settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)

KEPT = ("system", "developer")

#: Text that tokenizes in interesting ways: words, digits, spaces, CJK, emoji, accents, and
#: strings that look like special tokens (counted as plain text).
texts = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="ab cde 12\n\t", max_size=120),
    st.lists(
        st.sampled_from(
            ["hello", " world", "日本語", "é", "👍🏽", " ", "\n", "<|endoftext|>", "1234", "ß"]
        ),
        max_size=60,
    ).map("".join),
)


@st.composite
def messages(draw: st.DrawFn, role: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": draw(texts)}
    if draw(st.integers(min_value=0, max_value=5)) == 0:
        message["name"] = draw(st.text(alphabet="abcxyz_", min_size=1, max_size=8))
    return message


conversations = st.lists(
    st.sampled_from(["system", "developer", "user", "assistant", "user", "assistant"]).flatmap(
        messages
    ),
    max_size=10,
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int, str]:
    """A conversation, a limit around (mostly below) its count, and an encoding."""
    conversation = draw(conversations)
    encoding = draw(st.sampled_from(ENCODINGS))
    total = count_chat_tokens(conversation, encoding)
    limit = draw(
        st.integers(min_value=0, max_value=total + 5)
        | st.integers(min_value=max(total - 40, 0), max_value=total)
    )
    return conversation, limit, encoding


def fixed_cost(message: dict[str, Any], encoding: str) -> int:
    """A message's cost with its text cut away entirely (overhead, role, name)."""
    return count_message_tokens({**message, "content": ""}, encoding)


def last_user_index(conversation: list[dict[str, Any]]) -> int | None:
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    return users[-1] if users else None


def match_result(
    conversation: list[dict[str, Any]], result: list[dict[str, Any]], kept: list[int]
) -> dict[int, dict[str, Any]]:
    """Map each result message to the original index it came from: the result must be the
    original in order, with some messages left out and some ``kept`` ones cut (same role and
    name; content a suffix of the original). Untouched messages are the very same objects, and
    only a kept message may be a copy, so matching in order is unambiguous."""
    mapping: dict[int, dict[str, Any]] = {}
    i = 0
    for message in result:
        while i < len(conversation) and not (
            message is conversation[i] or (i in kept and _is_cut(conversation[i], message))
        ):
            i += 1
        assert i < len(conversation), f"{message!r} is not from the input, or out of order"
        mapping[i] = message
        i += 1
    return mapping


def _is_cut(original: dict[str, Any], message: dict[str, Any]) -> bool:
    rest = {k: v for k, v in message.items() if k != "content"}
    return rest == {k: v for k, v in original.items() if k != "content"} and original[
        "content"
    ].endswith(message["content"])


@SETTINGS
@given(cases())
def test_truncation_fits_keeps_what_it_must_and_drops_oldest_first(
    case: tuple[list[dict[str, Any]], int, str],
) -> None:
    conversation, limit, encoding = case
    before = copy.deepcopy(conversation)
    total = count_chat_tokens(conversation, encoding)
    last_user = last_user_index(conversation)
    kept = [i for i, m in enumerate(conversation) if m["role"] in KEPT or i == last_user]
    floor = REPLY_PRIMER_TOKENS + sum(fixed_cost(conversation[i], encoding) for i in kept)

    try:
        result, count = apply_token_limit(conversation, limit, False, encoding)
    except ContextLengthExceeded as error:
        # Only when even the fixed overhead of what must be kept is over the limit.
        assert total > limit and floor > limit
        assert (error.prompt_tokens, error.limit, error.code) == (
            total,
            limit,
            "context_length_exceeded",
        )
        assert conversation == before
        return
    assert total <= limit or floor <= limit
    assert conversation == before  # the input is never mutated

    # Within the limit, and the count is what a fresh count says.
    assert count <= limit
    assert count == count_chat_tokens(result, encoding)
    if total <= limit:
        assert result == conversation and all(
            a is b for a, b in zip(result, conversation, strict=True)
        )
        return

    mapping = match_result(conversation, result, kept)
    cut = {i for i, m in mapping.items() if m is not conversation[i]}
    dropped = [i for i in range(len(conversation)) if i not in mapping]

    # System, developer and the last user message are never dropped (only cut).
    assert all(i in mapping for i in kept)
    # Cutting starts only once every droppable turn is gone.
    if cut:
        assert sorted(mapping) == kept
    # The last user message is cut before any system or developer message is.
    if last_user is not None and cut - {last_user}:
        assert mapping[last_user]["content"] == ""
    # System and developer messages come through untouched whenever they fit alone (with the
    # last user message's fixed cost, which cannot go).
    pinned = [i for i in kept if i != last_user]
    alone = REPLY_PRIMER_TOKENS + sum(
        count_message_tokens(conversation[i], encoding) for i in pinned
    )
    if last_user is not None:
        alone += fixed_cost(conversation[last_user], encoding)
    if alone <= limit:
        assert all(mapping[i] is conversation[i] for i in pinned)

    # Whole turns go oldest first: the droppable messages that survive are the newest ones.
    droppable = [i for i in range(len(conversation)) if i not in kept]
    assert dropped == droppable[: len(dropped)]
    # ...and no more of them than needed: with the newest dropped one back, nothing cut, the
    # input would still be over the limit.
    if dropped:
        back = sorted([*mapping, dropped[-1]])
        assert count_chat_tokens([conversation[i] for i in back], encoding) > limit
    if cut:
        uncut = [conversation[i] for i in sorted(mapping)]
        assert count_chat_tokens(uncut, encoding) > limit


@SETTINGS
@given(cases())
def test_error_on_max_token_fails_over_the_limit_and_changes_nothing_under_it(
    case: tuple[list[dict[str, Any]], int, str],
) -> None:
    conversation, limit, encoding = case
    total = count_chat_tokens(conversation, encoding)
    if total > limit:
        with pytest.raises(ContextLengthExceeded) as info:
            apply_token_limit(conversation, limit, True, encoding)
        assert (info.value.prompt_tokens, info.value.limit) == (total, limit)
        assert info.value.code == "context_length_exceeded"
        assert info.value.param == "messages"
    else:
        result, count = apply_token_limit(conversation, limit, True, encoding)
        assert count == total
        assert result == conversation and result is not conversation
        assert all(a is b for a, b in zip(result, conversation, strict=True))


#: Words that each begin a pre-tokenizer chunk (a leading space, no digits), in both encodings:
#: a word is then encoded the same alone as at the end of a text, so "it fits alone" is exact.
WORDS = [" hello", " world", " 日本", " 👍", " x", " é", " Straße"]


@settings(SETTINGS, max_examples=80)
@given(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=400),
    st.sampled_from(ENCODINGS),
    st.data(),
)
def test_a_cut_user_message_keeps_its_newest_text(
    words: list[str], encoding: str, data: st.DataObject
) -> None:
    text = "".join(words)
    message = {"role": "user", "content": text}
    floor = REPLY_PRIMER_TOKENS + fixed_cost(message, encoding)
    top = count_chat_tokens([message], encoding)
    limit = data.draw(st.integers(min_value=floor, max_value=top))
    [kept], count = apply_token_limit([message], limit, False, encoding)
    assert count <= limit and count == count_chat_tokens([kept], encoding)
    assert text.endswith(kept["content"])
    # The newest text survives: the last word is there whenever it fits on its own...
    if count_chat_tokens([{"role": "user", "content": words[-1]}], encoding) <= limit:
        assert kept["content"].endswith(words[-1])
    # ...and at the limit of the whole message, nothing is cut.
    if limit == top:
        assert kept is message


@st.composite
def rich_messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Conversations with content parts (text and images) and tool calls with their answers."""
    result: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        kind = draw(st.sampled_from(["system", "developer", "user", "parts", "assistant", "tools"]))
        if kind == "parts":
            parts = draw(
                st.lists(
                    texts.map(lambda t: {"type": "text", "text": t})
                    | st.just({"type": "image_url", "image_url": {"url": "data:x"}}),
                    max_size=4,
                )
            )
            result.append({"role": "user", "content": parts})
        elif kind == "tools":
            calls = [
                {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": a}}
                for i, a in enumerate(draw(st.lists(texts, min_size=1, max_size=2)))
            ]
            result.append({"role": "assistant", "content": None, "tool_calls": calls})
            for call in calls:
                answer = draw(texts)
                result.append({"role": "tool", "tool_call_id": call["id"], "content": answer})
        else:
            result.append(draw(messages(kind)))
    return result


@settings(SETTINGS, max_examples=150)
@given(rich_messages(), st.sampled_from(ENCODINGS), st.data())
def test_parts_and_tool_calls_fit_and_no_tool_answer_loses_its_call(
    conversation: list[dict[str, Any]], encoding: str, data: st.DataObject
) -> None:
    before = copy.deepcopy(conversation)
    total = count_chat_tokens(conversation, encoding)
    limit = data.draw(st.integers(min_value=0, max_value=total + 3))
    try:
        result, count = apply_token_limit(conversation, limit, False, encoding)
    except ContextLengthExceeded as error:
        assert total > limit and error.prompt_tokens == total
        return
    finally:
        assert conversation == before  # never mutated
    assert count <= limit and count == count_chat_tokens(result, encoding)
    # A tool answer is never left without the assistant message that called it.
    called: set[str] = set()
    for message in result:
        for call in message.get("tool_calls") or []:
            called.add(call["id"])
        if message["role"] == "tool":
            assert message["tool_call_id"] in called
    # Cutting list content removes text only: the last user message keeps its other parts.
    last_user = last_user_index(conversation)
    if last_user is not None and isinstance(conversation[last_user]["content"], list):
        [kept] = [m for m in result if m["role"] == "user"][-1:]
        assert [p for p in kept["content"] if p["type"] != "text"] == [
            p for p in conversation[last_user]["content"] if p["type"] != "text"
        ]
