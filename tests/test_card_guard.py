"""The card-number guard: Luhn-valid 13-19 digit runs are refused, other digits pass."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.validation import CARD_MESSAGE, _first_problem, looks_like_card, luhn_ok


def with_check_digit(body: str) -> str:
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError("some digit always completes a Luhn number")


digits = st.text(alphabet="0123456789", min_size=12, max_size=18)


@given(digits)
def test_every_luhn_number_of_card_length_is_caught(body: str) -> None:
    card = with_check_digit(body)
    assert looks_like_card(card)
    assert looks_like_card(f"pay with {card} please")
    grouped = " ".join(card[i : i + 4] for i in range(0, len(card), 4))
    if len(card) == 16:
        assert looks_like_card(grouped)
        assert looks_like_card(grouped.replace(" ", "-"))


@given(st.text(alphabet="0123456789", min_size=13, max_size=19))
def test_a_digit_run_is_caught_exactly_when_luhn_holds(run: str) -> None:
    assert looks_like_card(run) == luhn_ok(run)


@given(st.text(alphabet="0123456789", min_size=1, max_size=12))
def test_short_runs_pass(run: str) -> None:
    assert not looks_like_card(run)


@given(st.uuids())
def test_uuids_are_never_cards(value: uuid.UUID) -> None:
    assert not looks_like_card(str(value))
    assert not looks_like_card(str(value).upper())


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a": 1, "b": {"c": ["x", 4242424242424242]}}, "b.c[1]"),
        ({"items": [{"note": "4000 0566 5566 5556"}]}, "items[0].note"),
        ({"ok": "4242424242424241", "n": 12345678901234}, None),
        ({"flag": True, "id": "00000000-0000-0000-0000-000000000007"}, None),
    ],
)
def test_the_path_names_the_field(value: object, path: str | None) -> None:
    assert _first_problem(value, True, False) == (None if path is None else (path, CARD_MESSAGE))
