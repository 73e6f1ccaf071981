"""Query-parameter parsing shared by the list endpoints (spec 3.2, 4.3, open point 12)."""

from __future__ import annotations

from typing import Any

from batchsvc.errors import InvalidRequest


def parse_limit(raw: str | None, *, default: int, maximum: int, clamp: bool) -> int:
    """Files reject out-of-range limits (``clamp=False``); batches clamp them to 1..maximum."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidRequest(
            "limit must be a positive integer", code="invalid_limit", param="limit"
        ) from None
    if clamp:
        return max(1, min(maximum, value))
    if value < 1 or value > maximum:
        raise InvalidRequest(
            f"limit must be a positive integer no greater than {maximum}",
            code="invalid_limit",
            param="limit",
        )
    return value


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A cursor-paginated list (spec 3.2, 4.3): ``last_id`` is the next page's ``after``."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
