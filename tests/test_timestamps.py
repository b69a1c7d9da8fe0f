"""server.http.timestamp: RFC 3339 UTC with milliseconds, whatever the instant and its zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.http import timestamp


def reference(dt: datetime) -> str:
    """The obvious (slower) formulation: truncate to milliseconds, print in UTC with a Z."""
    utc = dt.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + f".{utc.microsecond // 1000:03d}Z"


@pytest.mark.parametrize(
    ("dt", "text"),
    [
        (datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC), "2026-11-21T10:00:00.123Z"),
        (datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC), "2026-11-21T10:00:00.000Z"),
        (datetime(2026, 11, 21, 10, 0, 0, 999, tzinfo=UTC), "2026-11-21T10:00:00.000Z"),
        (datetime(2026, 11, 21, 10, 0, 0, 1000, tzinfo=UTC), "2026-11-21T10:00:00.001Z"),
        (datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "2026-12-31T23:59:59.999Z"),
        (
            datetime(
                2026, 11, 21, 11, 30, 0, 5000, tzinfo=timezone(timedelta(hours=1, minutes=30))
            ),
            "2026-11-21T10:00:00.005Z",
        ),
        (datetime(1000, 1, 1, tzinfo=UTC), "1000-01-01T00:00:00.000Z"),
    ],
)
def test_known_instants(dt: datetime, text: str) -> None:
    assert timestamp(dt) == text


@given(
    st.datetimes(
        min_value=datetime(1000, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=45))]
        ),
    )
)
def test_matches_the_reference_formatting(dt: datetime) -> None:
    assert timestamp(dt) == reference(dt)
