"""Query-parameter parsing shared by the list endpoints (spec 3.2, 4.3, open point 12)."""

from __future__ import annotations

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
