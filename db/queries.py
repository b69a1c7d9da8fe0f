"""Named SQL statements from sql/*.sql.

The format is aiosql's: a `-- name: verb_noun` line starts a block, the comment lines right
after it document the statement, and the block runs to the next `-- name:`. Code reads
`Q["get_user"]`; because the string is the same on every call, asyncpg's per-connection
statement cache prepares it once per connection.

`load` also records every statement's text under its name in `NAMES`, so tracing can name a
statement's span after it (`get_user`) from the SQL string alone, never from its parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

# A checkout keeps the SQL in sql/ beside db/; an installed package has it in db/sql/
# (pyproject.toml's package-dir). Migrations are in its migrations/ (db/migrate.py).
_DB = Path(__file__).resolve().parent
SQL_DIR = _DB / "sql" if (_DB / "sql").is_dir() else _DB.parent / "sql"

_NAME = re.compile(r"^--\s*name:\s*(?P<name>\S*)\s*$")
_VALID_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


# SQL text -> statement name, for every statement load() has read. Tracing looks the query up
# here; the text is the very string object the caller passes, so the lookup is a hash compare.
NAMES: dict[str, str] = {}


class QueryError(Exception):
    """A malformed .sql file, a duplicate name, or an unknown statement name."""


class Queries(Mapping[str, str]):
    def __init__(self, source: str, statements: dict[str, str]) -> None:
        self.source = source
        self._statements = statements

    def __getitem__(self, name: str) -> str:
        try:
            return self._statements[name]
        except KeyError:
            raise QueryError(f"{self.source} has no statement named {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._statements)

    def __len__(self) -> int:
        return len(self._statements)


def parse(text: str, source: str = "<string>") -> Queries:
    statements: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []

    def finish() -> None:
        if name is None:
            return
        sql = "\n".join(line for line in lines if not line.lstrip().startswith("--")).strip()
        sql = sql.rstrip(";").strip()
        if not sql:
            raise QueryError(f"{source}: statement {name!r} is empty")
        statements[name] = sql

    for lineno, line in enumerate(text.splitlines(), 1):
        m = _NAME.match(line)
        if m:
            finish()
            name = m["name"]
            if not _VALID_NAME.match(name):
                raise QueryError(f"{source}:{lineno}: invalid statement name {name!r}")
            if name in statements:
                raise QueryError(f"{source}:{lineno}: duplicate statement name {name!r}")
            lines = []
        elif name is None:
            if line.strip() and not line.lstrip().startswith("--"):
                raise QueryError(f"{source}:{lineno}: SQL before the first '-- name:' line")
        else:
            lines.append(line)
    finish()
    return Queries(source, statements)


def load(filename: str, directory: Path = SQL_DIR) -> Queries:
    path = directory / filename
    queries = parse(path.read_text(encoding="utf-8"), source=filename)
    NAMES.update({sql: name for name, sql in queries.items()})
    return queries


def name_of(sql: str) -> str:
    """The statement's `-- name:`, else its first keyword (BEGIN, COMMIT, an ad hoc SELECT)."""
    name = NAMES.get(sql)
    if name is None:
        head = sql.lstrip().split(None, 1)
        name = head[0].rstrip(";").upper() if head else "SQL"
    return name
