"""UUIDv7 ids."""

from __future__ import annotations

from db.ids import parse_uuid, uuid7


def test_uuid7_is_version_7_and_monotonic_within_a_millisecond() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {u.version for u in ids} == {7}
    assert {u.variant for u in ids} == {ids[0].variant}


def test_parse_uuid_accepts_only_canonical_strings() -> None:
    u = uuid7()
    assert parse_uuid(str(u)) == u
    for bad in ("", "x" * 36, str(u)[:-1], "{" + str(u) + "}", str(u).replace("-", "")):
        assert parse_uuid(bad) is None
