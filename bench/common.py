"""What every bench program agrees on: where things live, which database, the JSON shape."""

from __future__ import annotations

import base64
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
DATA_DIR = BENCH_DIR / "data"
RESULTS_DIR = BENCH_DIR / "results"
WRK_DIR = BENCH_DIR / "wrk"
DOCS_DIR = ROOT / "docs"
IDS_FILE = DATA_DIR / "ids.json"

# A database of its own: the suite truncates and reloads it, so it must never be `test` or a
# developer's database.
DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/surge_bench"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_KEY_PREFIX = "surgebench:"

TENANTS = 100
USERS_PER_TENANT = 1000

USER_FIELDS = (
    "id",
    "tenant_id",
    "email",
    "username",
    "status",
    "roles",
    "profile",
    "version",
    "created_at",
    "updated_at",
)

# Bench-only sink for POST /v1/events on the baseline and the FastAPI peer. Surge will own its
# own events table; this one only gives the peers the same amount of work per event.
EVENTS_TABLE = "bench_events"
EVENTS_DDL = f"""
CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id uuid NOT NULL,
    name      text NOT NULL,
    ts        timestamptz NOT NULL,
    user_id   uuid,
    props     jsonb NOT NULL DEFAULT '{{}}'::jsonb
)
"""
EVENTS_COLUMNS = ("tenant_id", "name", "ts", "user_id", "props")


def format_ts(value: datetime) -> str:
    """RFC 3339 UTC with milliseconds, the contract's timestamp: 2026-11-21T10:00:00.123Z."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # isoformat is implemented in C; slicing off "+00:00" is cheaper than strftime.
    return value.isoformat(timespec="milliseconds")[:-6] + "Z"


def encode_cursor(last_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(last_id.bytes).rstrip(b"=").decode()


def parse_limit(raw: str | None, default: int = 50, maximum: int = 200) -> int | None:
    """?limit= as the contract bounds it (1..200, default 50); None when out of range."""
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 3:
        return None
    value = int(raw)
    return value if 1 <= value <= maximum else None


def sample_event(i: int, user_id: str | None) -> dict[str, Any]:
    """One analytics event as a frontend would send it; varied so bodies don't compress to one."""
    return {
        "name": ("page_view", "click", "signup_step", "search")[i % 4],
        "user_id": user_id,
        "props": {"path": f"/products/{i * 7919 % 10007}", "ref": "bench", "n": i},
    }
