from __future__ import annotations

import pytest

from db.queries import SQL_DIR, QueryError, load, parse


def test_parses_named_blocks_with_doc_comments() -> None:
    q = parse(
        "-- name: get_a\n-- Fetch one a.\nSELECT 1\nFROM a;\n\n-- name: list_b\nSELECT 2\n",
        "t.sql",
    )
    assert dict(q) == {"get_a": "SELECT 1\nFROM a", "list_b": "SELECT 2"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n", "duplicate statement name 'a'"),
        ("SELECT 1\n-- name: a\nSELECT 2\n", "before the first"),
        ("-- name: a\n-- only a comment\n", "is empty"),
        ("-- name: Bad-Name\nSELECT 1\n", "invalid statement name"),
    ],
)
def test_malformed_files_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(QueryError, match=fragment):
        parse(text, "t.sql")


def test_unknown_name_fails_with_the_file_name() -> None:
    q = parse("-- name: a\nSELECT 1\n", "t.sql")
    with pytest.raises(QueryError, match=r"t\.sql has no statement named 'nope'"):
        q["nope"]


@pytest.mark.parametrize("path", sorted(p.name for p in SQL_DIR.glob("*.sql")))
def test_every_shipped_file_loads(path: str) -> None:
    assert len(load(path)) > 0


def test_a_page_and_its_versions_select_the_same_rows() -> None:
    """list_user_versions is list_users' page as (id, version) pairs (ViewMemo in
    handlers/identity/views.py): the two must filter, order and limit alike, or a memoized page
    would differ from a read one."""
    q = load("users.sql")
    full, versions = q["list_users"], q["list_user_versions"]
    assert full.startswith("SELECT id, tenant_id, ") and versions.startswith("SELECT id, version\n")
    assert full[full.index("FROM users") :] == versions[versions.index("FROM users") :]


VISIBLE_USER_COLUMNS = ("email", "username", "status", "roles", "profile")


@pytest.mark.parametrize("path", sorted(p.name for p in SQL_DIR.glob("*.sql")))
def test_every_visible_change_to_a_user_bumps_its_version(path: str) -> None:
    """Users' bodies are reused by version (ViewMemo, the user cache's never-older check): a
    statement that changes what a user's body shows without bumping `version` would serve a
    stale body."""
    for name, sql in load(path).items():
        if not sql.lstrip().upper().startswith("UPDATE USERS"):
            continue
        assigned = " ".join(sql[sql.upper().index("SET") : sql.upper().index("WHERE")].split())
        touched = [c for c in VISIBLE_USER_COLUMNS if f"{c} =" in assigned]
        if touched:
            assert "version = version + 1" in assigned, (name, touched)
