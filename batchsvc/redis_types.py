"""redis-py's replies as the ``str`` batchsvc works with, and what its writes take.

redis-py types every string reply ``bytes | str`` (``str`` for a client that decodes
responses) and a sorted-set range as members or scored pairs. batchsvc's clients never decode
responses, so a reply is bytes; it is turned into text here, in one place, rather than by a
``.decode()`` at every read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from redis.typing import EncodableT, FieldT

#: A hash's fields as ``hset(mapping=...)`` takes them (redis-py's own field and value types).
HashMapping = dict[FieldT, EncodableT]


def text(value: bytes | str) -> str:
    """A string reply as ``str``: bytes decoded as UTF-8, a ``str`` as it is (``str()`` also
    turns a number a Lua script returned where a string was expected into its text)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_fields(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A hash reply (``hgetall``) with its fields and values as ``str``."""
    return {text(k): text(v) for k, v in raw.items()}


def members(reply: Iterable[object]) -> list[str]:
    """The members of a set or sorted-set range reply as ``str``. redis-py types a range as
    possibly scored pairs (``withscores=True``, which batchsvc never asks for): a member that
    is not a string is a bug, and says so."""
    found: list[str] = []
    for member in reply:
        if not isinstance(member, bytes | str):
            raise TypeError(f"expected a set member, got {member!r}")
        found.append(text(member))
    return found
