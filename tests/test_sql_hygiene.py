"""The pool's cheap reset (no RESET ALL / UNLISTEN / advisory unlock on release) is safe only
while nothing leaves session state on a pooled connection. This enforces it."""

from __future__ import annotations

import re

import pytest

from db.queries import parse

from .conftest import ROOT

SESSION_STATE = [
    (re.compile(r"\A\s*SET\s+(?!LOCAL\b)(?!CONSTRAINTS\b)", re.I), "SET outside SET LOCAL"),
    (re.compile(r"\bLISTEN\b", re.I), "LISTEN"),
    (re.compile(r"pg_advisory_lock\s*\(", re.I), "session advisory lock"),
    (re.compile(r"\bPREPARE\s+\w+\s+AS\b", re.I), "SQL-level PREPARE"),
    (re.compile(r"\bCREATE\s+TEMP(ORARY)?\s+TABLE\b", re.I), "temporary table"),
]

_SQL_CALL = re.compile(r"\.(?:execute|executemany|fetch|fetchrow|fetchval)\(\s*f?\"([^\"]*)\"")

SOURCES = sorted(
    [p for p in (ROOT / "sql").glob("*.sql")]
    + [p for d in ("handlers", "db", "server") for p in (ROOT / d).rglob("*.py")]
)
# The migrations runner takes a session advisory lock on its own connection, never a pooled one.
ALLOWED = {ROOT / "db" / "migrate.py": {"session advisory lock"}}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_session_state_on_pooled_connections(path) -> None:  # type: ignore[no-untyped-def]
    if path.suffix == ".py":  # the SQL literals handed to asyncpg
        statements = _SQL_CALL.findall(path.read_text())
    else:
        statements = list(parse(path.read_text(), path.name).values())
    found = {label for rx, label in SESSION_STATE for sql in statements if rx.search(sql)}
    assert found <= ALLOWED.get(path, set()), f"{path.name}: {found}"
