"""batchsvc.tokens: offline encodings, cookbook counting, and the per-model token limit."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import urllib.request
from typing import Any

import pytest
import requests

from batchsvc import tokens
from batchsvc.errors import ContextLengthExceeded, LineError
from batchsvc.tokens import (
    apply_token_limit,
    count_chat_tokens,
    count_text_tokens,
    get_encoding,
)

CL100K = "cl100k_base"
O200K = "o200k_base"
BOTH = pytest.mark.parametrize("enc", [CL100K, O200K])


def ids(text: str, enc: str) -> list[int]:
    return get_encoding(enc).encode_ordinary(text)


def n(text: str, enc: str) -> int:
    return count_text_tokens(text, enc)


def msg_cost(message: dict[str, Any], enc: str) -> int:
    """One message's share of count_chat_tokens (no primer)."""
    return count_chat_tokens([message], enc) - 3


# --- encodings ---------------------------------------------------------------------------


def test_hello_world_token_ids_are_pinned() -> None:
    assert ids("hello world", CL100K) == [15339, 1917]
    assert ids("hello world", O200K) == [24912, 2375]
    assert count_text_tokens("hello world", CL100K) == 2
    assert count_text_tokens("hello world", O200K) == 2


def test_encodings_differ_where_they_should() -> None:
    assert count_text_tokens("Здравствуйте, мир!", CL100K) == 10
    assert count_text_tokens("Здравствуйте, мир!", O200K) == 4
    assert count_text_tokens("", CL100K) == 0


def test_get_encoding_is_cached_and_only_knows_two_names() -> None:
    assert get_encoding(CL100K) is get_encoding(CL100K)
    assert get_encoding(O200K).name == O200K
    for name in ("p50k_base", "r50k_base", "gpt2", "o200k_harmony", "nope"):
        with pytest.raises(ValueError, match="unknown encoding"):
            get_encoding(name)


def test_special_token_text_counts_as_plain_text() -> None:
    assert count_text_tokens("<|endoftext|>", CL100K) == 7
    assert count_text_tokens("<|endoftext|>", O200K) == 7


def test_loading_makes_no_network_call_and_ignores_the_cache_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network access while loading an encoding")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cache_dir = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "data-gym"))
    environ_before = dict(os.environ)

    get_encoding.cache_clear()
    assert get_encoding(CL100K).encode("hello world") == [15339, 1917]
    assert get_encoding(O200K).encode("hello world") == [24912, 2375]

    assert dict(os.environ) == environ_before
    assert not cache_dir.exists()  # tiktoken's cache is neither read nor written
    assert not (tmp_path / "data-gym").exists()


def test_a_corrupted_bpe_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in os.listdir(tokens.ENCODINGS_DIR):
        shutil.copy(tokens.ENCODINGS_DIR / name, tmp_path / name)
    cl100k_file = tmp_path / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
    cl100k_file.write_bytes(cl100k_file.read_bytes()[:-10])  # drop the last line's bytes
    monkeypatch.setattr(tokens, "ENCODINGS_DIR", tmp_path)
    get_encoding.cache_clear()
    try:
        with pytest.raises(ValueError, match="does not match sha256"):
            get_encoding(CL100K)
        (tmp_path / "fb374d419588a4632f3f557e76b4b70aebbca790").unlink()
        with pytest.raises(RuntimeError, match="not packaged"):
            get_encoding(O200K)
    finally:
        get_encoding.cache_clear()  # failures are not cached, but be explicit


def test_packaged_file_names_are_tiktoken_cache_names() -> None:
    base = "https://openaipublic.blob.core.windows.net/encodings/"
    assert tokens.bpe_file_name(base + "cl100k_base.tiktoken") == (
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
    )
    assert tokens.bpe_file_name(base + "o200k_base.tiktoken") == (
        "fb374d419588a4632f3f557e76b4b70aebbca790"
    )


# --- counting ----------------------------------------------------------------------------

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "name": "bob", "content": "Здравствуйте, мир!"},
    {"role": "assistant", "content": "Paris."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Describe this image."},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ],
    },
]

# The encodes of every counted part of CONVERSATION, pinned.
PIECES = {
    CL100K: {
        "system": [9125],
        "user": [882],
        "assistant": [78191],
        "You are a helpful assistant.": [2675, 527, 264, 11190, 18328, 13],
        "bob": [48186],
        "Здравствуйте, мир!": [36551, 7094, 28086, 20812, 83680, 51627, 11, 11562, 78746, 0],
        "Paris.": [60704, 13],
        "Describe this image.": [75885, 420, 2217, 13],
    },
    O200K: {
        "system": [17360],
        "user": [1428],
        "assistant": [173781],
        "You are a helpful assistant.": [3575, 553, 261, 10297, 29186, 13],
        "bob": [109200],
        "Здравствуйте, мир!": [182298, 11, 37934, 0],
        "Paris.": [72782, 13],
        "Describe this image.": [61443, 495, 3621, 13],
    },
}


@BOTH
def test_conversation_count_follows_the_cookbook_formula(enc: str) -> None:
    for text, pinned in PIECES[enc].items():
        assert ids(text, enc) == pinned, text
    p = {text: len(token_ids) for text, token_ids in PIECES[enc].items()}
    per_message, per_name, primer = 3, 1, 3
    expected = (
        (per_message + p["system"] + p["You are a helpful assistant."])
        + (per_message + p["user"] + p["bob"] + per_name + p["Здравствуйте, мир!"])
        + (per_message + p["assistant"] + p["Paris."])
        + (per_message + p["user"] + p["Describe this image."])  # the image part counts 0
        + primer
    )
    assert count_chat_tokens(CONVERSATION, enc) == expected


def test_conversation_totals_are_pinned() -> None:
    # cl100k: (3+1+6) + (3+1+1+1+10) + (3+1+2) + (3+1+4) + 3 = 43
    assert count_chat_tokens(CONVERSATION, CL100K) == 43
    # o200k:  (3+1+6) + (3+1+1+1+4)  + (3+1+2) + (3+1+4) + 3 = 37
    assert count_chat_tokens(CONVERSATION, O200K) == 37


def test_openai_cookbook_example_matches_the_cookbook_numbers() -> None:
    # The cookbook's "How to count tokens with tiktoken" example: 129 for gpt-4, 124 for gpt-4o.
    example = [
        {
            "role": "system",
            "content": "You are a helpful, pattern-following assistant that translates "
            "corporate jargon into plain English.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "New synergies will help drive top-line growth.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Things working well together will increase revenue.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "Let's circle back when we have more bandwidth to touch base on "
            "opportunities for increased leverage.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Let's talk later when we're less busy about how to do better.",
        },
        {
            "role": "user",
            "content": "This late pivot means we don't have time to boil the ocean for the "
            "client deliverable.",
        },
    ]
    assert count_chat_tokens(example, CL100K) == 129
    assert count_chat_tokens(example, O200K) == 124


def test_empty_conversation_is_the_primer() -> None:
    assert count_chat_tokens([], CL100K) == 3


@BOTH
def test_missing_or_none_content_counts_zero(enc: str) -> None:
    assert count_chat_tokens([{"role": "assistant", "content": None}], enc) == 3 + 1 + 3
    assert count_chat_tokens([{"role": "assistant"}], enc) == 3 + 1 + 3


@BOTH
def test_tool_calls_count_as_the_json_of_name_and_arguments(enc: str) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    as_text = json.dumps(call["function"], separators=(",", ":"))
    assert as_text == '{"name":"get_weather","arguments":"{\\"city\\":\\"Paris\\"}"}'
    assert n(as_text, enc) == 15
    assert msg_cost(message, enc) == 3 + 1 + 15
    tool_answer = {"role": "tool", "tool_call_id": "call_1", "content": "It is sunny."}
    assert msg_cost(tool_answer, enc) == 3 + 1 + 4  # tool_call_id is not counted


@BOTH
def test_malformed_messages_count_what_is_countable(enc: str) -> None:
    messages: list[Any] = [
        "not a message",  # overhead only
        None,  # overhead only
        {"role": 7, "name": ["x"], "content": 12},  # overhead only
        {"role": "user", "content": [{"type": "text", "text": 5}, "x", {"type": "text"}]},
        {"role": "user", "content": {"type": "text", "text": "hello world"}},  # not a list
        {"role": "assistant", "tool_calls": "nope", "function_call": 3},
        {"role": "assistant", "tool_calls": [None, {"function": "x"}, {"id": "c"}]},
    ]
    assert count_chat_tokens(messages, enc) == 3 * 7 + 4 * 1 + 3
    assert count_chat_tokens("not a list", enc) == 3  # type: ignore[arg-type]


# --- the limit ---------------------------------------------------------------------------


def conversation_with_history() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "First question about the weather in Paris today?"},
        {"role": "assistant", "content": "It is sunny and warm in Paris today."},
        {"role": "user", "content": "And tomorrow, will it rain in the afternoon?"},
        {"role": "assistant", "content": "Tomorrow brings light rain after lunch."},
        {"role": "user", "content": "Thanks! What should I wear for that?"},
    ]


def check(result: list[dict[str, Any]], count: int, limit: int, enc: str) -> None:
    assert count <= limit
    assert count == count_chat_tokens(result, enc)


@BOTH
def test_within_the_limit_nothing_changes(enc: str) -> None:
    messages = conversation_with_history()
    total = count_chat_tokens(messages, enc)
    for error_on_max_token in (True, False):
        result, count = apply_token_limit(messages, total, error_on_max_token, enc)
        assert result == messages and result is not messages
        assert all(a is b for a, b in zip(result, messages, strict=True))
        assert count == total


@BOTH
def test_error_on_max_token_raises_with_the_counts(enc: str) -> None:
    messages = conversation_with_history()
    total = count_chat_tokens(messages, enc)
    snapshot = copy.deepcopy(messages)
    with pytest.raises(ContextLengthExceeded) as caught:
        apply_token_limit(messages, total - 1, True, enc)
    error = caught.value
    assert isinstance(error, LineError)
    assert (error.prompt_tokens, error.limit) == (total, total - 1)
    assert error.code == "context_length_exceeded"
    assert error.param == "messages"
    assert error.line_message == (
        f"[legacy:http_400] Input is {total} tokens; this model accepts at most {total - 1}"
    )
    assert messages == snapshot


@BOTH
def test_the_oldest_turns_are_dropped_first(enc: str) -> None:
    messages = conversation_with_history()
    snapshot = copy.deepcopy(messages)
    total = count_chat_tokens(messages, enc)
    first_turn = msg_cost(messages[1], enc) + msg_cost(messages[2], enc)

    # Dropping the first user message alone is not enough; the first exchange is.
    limit = total - first_turn
    result, count = apply_token_limit(messages, limit, False, enc)
    assert result == [messages[0], messages[3], messages[4], messages[5]]
    assert count == limit
    check(result, count, limit, enc)

    # One token less: the second user message (the next oldest) goes too.
    result, count = apply_token_limit(messages, limit - 1, False, enc)
    assert result == [messages[0], messages[4], messages[5]]
    check(result, count, limit - 1, enc)

    # Dropping only what is needed: the oldest message alone.
    limit = total - msg_cost(messages[1], enc)
    result, count = apply_token_limit(messages, limit, False, enc)
    assert result == [messages[0], *messages[2:]]
    check(result, count, limit, enc)
    assert messages == snapshot


@BOTH
def test_a_tool_call_and_its_answers_are_dropped_together(enc: str) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    call2 = {**call, "id": "call_2", "function": {"name": "get_time", "arguments": "{}"}}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call, call2]},
        {"role": "tool", "tool_call_id": "call_1", "content": "It is sunny."},
        {"role": "tool", "tool_call_id": "call_2", "content": "It is noon."},
        {"role": "assistant", "content": "It is sunny at noon."},
        {"role": "user", "content": "Thanks!"},
    ]
    snapshot = copy.deepcopy(messages)
    total = count_chat_tokens(messages, enc)
    # Dropping the user turn and the tool-calling assistant message would be enough by count,
    # but its tool answers must not be left behind.
    limit = total - msg_cost(messages[1], enc) - msg_cost(messages[2], enc)
    result, count = apply_token_limit(messages, limit, False, enc)
    assert result == [messages[0], messages[5], messages[6]]
    check(result, count, limit, enc)
    assert count == limit - msg_cost(messages[3], enc) - msg_cost(messages[4], enc)
    assert messages == snapshot


@BOTH
def test_system_and_developer_messages_are_always_kept(enc: str) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "First question about the weather in Paris today?"},
        {"role": "developer", "content": "Answer in one short sentence."},
        {"role": "assistant", "content": "It is sunny and warm in Paris today."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "system", "content": "Be polite."},
    ]
    keep = [messages[0], messages[2], messages[4], messages[5]]
    limit = count_chat_tokens(keep, enc)
    result, count = apply_token_limit(messages, limit, False, enc)
    assert result == keep
    check(result, count, limit, enc)


@BOTH
def test_the_last_user_message_is_cut_from_its_start(enc: str) -> None:
    system = {"role": "system", "content": "You are a helpful assistant."}
    words = " ".join(f"word{i}" for i in range(400))
    user = {"role": "user", "name": "bob", "content": words}
    messages = [
        system,
        {"role": "user", "content": "An older question."},
        {"role": "assistant", "content": "An older answer."},
        user,
    ]
    snapshot = copy.deepcopy(messages)
    overhead = count_chat_tokens([system], enc) + 3 + 1 + n("bob", enc) + 1  # user: role, name
    budget = 50
    result, count = apply_token_limit(messages, overhead + budget, False, enc)
    assert [m["role"] for m in result] == ["system", "user"]
    assert result[0] is system
    cut = result[1]["content"]
    assert words.endswith(cut) and len(cut) < len(words)
    assert cut.endswith("word399")
    assert n(cut, enc) == budget  # the largest suffix that fits (token-exact)
    assert result[1]["name"] == "bob"
    check(result, count, overhead + budget, enc)
    assert count == overhead + budget
    assert messages == snapshot


@BOTH
def test_list_content_is_cut_from_its_oldest_text_part(enc: str) -> None:
    system = {"role": "system", "content": "Be brief."}
    old_text = " ".join(f"alpha{i}" for i in range(100))
    new_text = " ".join(f"omega{i}" for i in range(100))
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    user = {
        "role": "user",
        "content": [{"type": "text", "text": old_text}, image, {"type": "text", "text": new_text}],
    }
    messages = [system, user]
    snapshot = copy.deepcopy(messages)
    overhead = count_chat_tokens([system], enc) + 3 + 1
    old_n, new_n = n(old_text, enc), n(new_text, enc)

    # The excess is smaller than the oldest part: only that part is cut, from its start.
    limit = overhead + new_n + 10
    result, count = apply_token_limit(messages, limit, False, enc)
    parts = result[1]["content"]
    assert len(parts) == 3 and parts[1] is image and parts[2] == user["content"][2]
    assert old_text.endswith(parts[0]["text"]) and parts[0]["text"].endswith("alpha99")
    assert n(parts[0]["text"], enc) == 10
    check(result, count, limit, enc)

    # The excess is larger than the oldest part: it goes, and the next text part is cut.
    limit = overhead + new_n - 7
    result, count = apply_token_limit(messages, limit, False, enc)
    parts = result[1]["content"]
    assert parts[0] is image and len(parts) == 2
    assert new_text.endswith(parts[1]["text"]) and parts[1]["text"].endswith("omega99")
    assert n(parts[1]["text"], enc) == new_n - 7
    check(result, count, limit, enc)
    assert old_n > 7
    assert messages == snapshot


def instructions_conversation() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},  # 6 tokens
        {"role": "user", "content": "First question about the weather in Paris today?"},
        {"role": "developer", "content": "Answer in one short sentence."},  # 6 tokens
        {"role": "assistant", "content": "It is sunny and warm in Paris today."},
        {"role": "user", "content": "And tomorrow?"},
    ]


#: primer 3 + (3 + "system" 1) + (3 + "developer" 1) + (3 + "user" 1): what is left when every
#: kept text is cut away (the same in both encodings).
INSTRUCTIONS_FLOOR = 15


@BOTH
def test_system_and_developer_text_is_cut_only_once_the_last_user_text_is_gone(enc: str) -> None:
    # Given a conversation whose system and developer messages alone are 6 + 6 tokens of text
    messages = instructions_conversation()
    snapshot = copy.deepcopy(messages)
    system, developer = messages[0], messages[2]
    assert count_chat_tokens([system, developer, {"role": "user"}], enc) == INSTRUCTIONS_FLOOR + 12

    # When the limit leaves room for 12 - 4 tokens of text (and none for the last user message)
    result, count = apply_token_limit(messages, INSTRUCTIONS_FLOOR + 8, False, enc)

    # Then the other turns are gone, the last user message is empty, and the oldest
    # instruction (the system message) lost its first 4 tokens; the developer message is whole
    assert [m["role"] for m in result] == ["system", "developer", "user"]
    assert result[2] == {"role": "user", "content": ""}
    assert result[1] is developer
    assert system["content"].endswith(result[0]["content"])
    assert n(result[0]["content"], enc) == 2
    assert result[0]["content"] == " assistant."
    assert count == INSTRUCTIONS_FLOOR + 8
    check(result, count, INSTRUCTIONS_FLOOR + 8, enc)
    assert messages == snapshot


@BOTH
def test_an_emptied_system_message_stays_and_the_next_instruction_is_cut(enc: str) -> None:
    messages = instructions_conversation()
    # Room for 3 tokens of the 12: the system text goes entirely, the developer text loses 3
    result, count = apply_token_limit(messages, INSTRUCTIONS_FLOOR + 3, False, enc)
    assert result[0] == {"role": "system", "content": ""}
    assert result[1]["role"] == "developer"
    assert n(result[1]["content"], enc) == 3
    assert result[1]["content"] == " short sentence."
    assert result[2] == {"role": "user", "content": ""}
    assert count == INSTRUCTIONS_FLOOR + 3
    check(result, count, INSTRUCTIONS_FLOOR + 3, enc)


@BOTH
def test_only_the_fixed_overhead_over_the_limit_fails_when_truncating(enc: str) -> None:
    messages = instructions_conversation()
    total = count_chat_tokens(messages, enc)
    # At the floor every kept text is cut away, and it fits exactly
    result, count = apply_token_limit(messages, INSTRUCTIONS_FLOOR, False, enc)
    assert result == [
        {"role": "system", "content": ""},
        {"role": "developer", "content": ""},
        {"role": "user", "content": ""},
    ]
    assert count == INSTRUCTIONS_FLOOR
    check(result, count, INSTRUCTIONS_FLOOR, enc)
    # One token below it nothing can fit: context_length_exceeded with the full count
    with pytest.raises(ContextLengthExceeded) as caught:
        apply_token_limit(messages, INSTRUCTIONS_FLOOR - 1, False, enc)
    assert (caught.value.prompt_tokens, caught.value.limit) == (total, INSTRUCTIONS_FLOOR - 1)
    assert caught.value.code == "context_length_exceeded"


@BOTH
def test_names_and_tool_calls_of_kept_messages_count_toward_the_fixed_overhead(enc: str) -> None:
    messages = [
        {"role": "system", "name": "rules", "content": "Be brief."},
        {"role": "user", "content": "Hello there, how are you today?"},
    ]
    floor = 3 + (3 + 1 + n("rules", enc) + 1) + (3 + 1)
    result, count = apply_token_limit(messages, floor, False, enc)
    assert result == [
        {"role": "system", "name": "rules", "content": ""},
        {"role": "user", "content": ""},
    ]
    assert count == floor
    with pytest.raises(ContextLengthExceeded):
        apply_token_limit(messages, floor - 1, False, enc)


@BOTH
def test_without_a_user_message_the_other_turns_go(enc: str) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "assistant", "content": "A long earlier answer " * 20},
    ]
    limit = count_chat_tokens(messages[:1], enc)
    result, count = apply_token_limit(messages, limit, False, enc)
    assert result == messages[:1]
    check(result, count, limit, enc)


@BOTH
def test_result_always_fits_and_is_counted_exactly(enc: str) -> None:
    """Every limit from the floor up: multi-byte text makes decoded suffixes re-encode oddly."""
    messages: list[Any] = [
        {"role": "system", "content": "Réponds en français. 🙂"},
        "garbage",
        {"role": "user", "content": "こんにちは世界 " * 5},
        {"role": "assistant", "content": "Здравствуйте, мир! " * 4},
        {"role": "user", "content": "naïve café 🙂🙂 こんにちは世界 Здравствуйте " * 6},
    ]
    snapshot = copy.deepcopy(messages)
    total = count_chat_tokens(messages, enc)
    floor = count_chat_tokens([{"role": "system"}, {"role": "user"}], enc)  # fixed overhead only
    system_whole = count_chat_tokens([messages[0], {"role": "user"}], enc)
    for limit in range(floor, total + 2):
        result, count = apply_token_limit(messages, limit, False, enc)
        check(result, count, limit, enc)
        assert result[0]["role"] == "system" and result[-1]["role"] == "user"
        assert messages[0]["content"].endswith(result[0]["content"])
        assert messages[-1]["content"].endswith(result[-1]["content"])
        # the system text is cut only once the last user text is gone
        assert (result[0] is messages[0]) == (limit >= system_whole)
        if limit < system_whole:
            assert result[-1]["content"] == ""
    with pytest.raises(ContextLengthExceeded):
        apply_token_limit(messages, floor - 1, False, enc)
    assert messages == snapshot


class GrowingEncoding:
    """A real encoding, except that any text not starting with "S" costs 3 tokens more:
    a decoded suffix re-encodes to more tokens than it was cut to."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def encode_ordinary(self, text: str) -> list[int]:
        extra = [] if not text or text.startswith("S") else [0, 0, 0]
        return self.real.encode_ordinary(text) + extra

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        return self.real.decode_bytes(token_ids)


def test_the_cut_shrinks_until_the_re_encoded_suffix_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = get_encoding(CL100K)
    monkeypatch.setattr(tokens, "get_encoding", lambda name: GrowingEncoding(real))
    text = "Start " + " ".join(f"word{i}" for i in range(200))
    messages = [{"role": "user", "content": text}]
    # "user" role + overhead + primer: the roles do not start with "S" either.
    overhead = count_chat_tokens([{"role": "user"}], CL100K)
    limit = overhead + 40
    result, count = apply_token_limit(messages, limit, False, CL100K)
    cut = result[0]["content"]
    assert text.endswith(cut) and cut.endswith("word199")
    assert len(real.encode_ordinary(cut)) == 40 - 3  # shrunk by the re-encoding's growth
    assert count == limit == count_chat_tokens(result, CL100K)
