"""What a line task's message shows of its arguments: ``line_argsrepr`` takes a shortcut past
Celery's saferepr, which must show every line exactly as saferepr would (Flower and Celery's
log lines print it)."""

from __future__ import annotations

from celery.utils.saferepr import saferepr
from hypothesis import given
from hypothesis import strategies as st

from workers.fanout import ARGSREPR_MAXSIZE, LINE_KWARGSREPR, line_argsrepr


@given(
    batch_id=st.text(max_size=40),
    index=st.integers(min_value=0, max_value=10**9),
    custom_id=st.text(max_size=300),
    model=st.text(max_size=40),
)
def test_the_argsrepr_is_the_one_saferepr_gives(
    batch_id: str, index: int, custom_id: str, model: str
) -> None:
    assert line_argsrepr(batch_id, index, custom_id, model) == saferepr(
        [batch_id, index, custom_id, model], ARGSREPR_MAXSIZE
    )


def test_strings_repr_would_escape_are_shown_as_saferepr_shows_them() -> None:
    for custom_id in ("it's", 'say "hi"', "back\\slash", "two\nlines", "tab\t", "\x00", "\xa0"):
        assert line_argsrepr("batch_a", 1, custom_id, "m") == saferepr(
            ["batch_a", 1, custom_id, "m"], ARGSREPR_MAXSIZE
        )


def test_a_long_custom_id_is_cut_as_saferepr_cuts_it() -> None:
    custom_id = "x" * 2000
    text = line_argsrepr("batch_a", 1, custom_id, "m")
    assert text == saferepr(["batch_a", 1, custom_id, "m"], ARGSREPR_MAXSIZE)
    assert len(text) < 2000


def test_the_kwargsrepr_is_the_one_saferepr_gives() -> None:
    assert LINE_KWARGSREPR == saferepr({}, ARGSREPR_MAXSIZE)
