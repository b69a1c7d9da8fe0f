"""Decode + validate a request body: today's path against msgspec Structs of the same shapes.

Today a body is `orjson.loads`, then `screen` (server/validation.py: depth, card numbers, NUL,
numbers that would not be stored exactly), then either the schema's compiled validator
(fastjsonschema, `read_json`) or, for POST /v1/events, the hand-written `parse_batch`
(handlers/events/ingest.py), which validates and builds the COPY records in one loop.

The msgspec path declares the same shapes as `msgspec.Struct`s with `Meta` constraints and
decodes with `msgspec.json.Decoder(type)`; what msgspec cannot say (uniqueItems,
minProperties, the props size, the 24-hour window) is checked in Python after it. `screen`
stays on both paths: msgspec knows nothing of card numbers, and the check is a rule of the
project, not of a schema. For the events body, both paths end with the same COPY records (the
bench checks that they are equal before it times anything).

Two measures, per body, lower is better:
    .venv/bin/python -m bench.decode                    # µs per body: timeit, best of rounds
    .venv/bin/python -m bench.decode --instructions     # instructions per body (callgrind)

The instruction count (valgrind's callgrind, switched on for the measured loop only, as in
bench/instructions.py) is the figure to trust on this shared machine; the times show the
order of magnitude. Results and the decision: docs/PERFORMANCE.md, "Request decoding".
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import timeit
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import orjson
from msgspec import UNSET, Meta, Struct, UnsetType

from bench.common import ROOT, sample_event
from db.events import CopyRecord, MinuteCounts, pg_micros
from db.ids import UUID_RE
from db.users import STATUSES
from handlers.api import validators
from handlers.events.api import MAX_EVENTS, MAX_PROPS_BYTES, MAX_PROPS_KEYS, NAME_RE
from handlers.events.ingest import MAX_SKEW, PROPS_DEPTH, _has_nul, parse_batch
from handlers.identity.api import SCHEMAS as IDENTITY_SCHEMAS
from server.errors import ValidationFailed
from server.validation import (
    MAX_DEPTH,
    _card_shaped,
    _digit_runs,
    _inexact_suspect,
    screen,
    too_deep,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
TENANT = str(uuid.UUID(int=7))

# -- the bodies ---------------------------------------------------------------------------------


def events_body(n: int = 100) -> bytes:
    """POST /v1/events: n events as bench/events_ingest.py sends them, half with a timestamp."""
    events = []
    for i in range(n):
        # Ten users with uuid4-like ids (bench/events_ingest.py's UUID(int=b) is all digits,
        # which sends every body through screen()'s slow look at card-shaped dashes).
        user = str(uuid.UUID(int=(i % 10 + 1) * 0x9E3779B97F4A7C15F39CC0605CEDC835 % (1 << 128)))
        event = sample_event(i, user if i % 2 else None)
        if i % 2 == 0:
            event["ts"] = (NOW - timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
        events.append(event)
    return orjson.dumps({"events": events})


CREATE_USER = orjson.dumps(
    {
        "email": "grace.hopper@example.com",
        "username": "grace",
        "password": "correct horse battery staple",
        "roles": ["admin", "member"],
        "profile": {"display_name": "Grace Hopper", "team": "compilers", "locale": "en-US"},
    }
)
PATCH_USER = orjson.dumps({"username": "amazing_grace", "profile": {"team": "cobol"}})

# -- msgspec: the same shapes -------------------------------------------------------------------


def _pattern(schema: dict[str, Any]) -> Meta:
    """A string schema of the OpenAPI document as msgspec constraints (the same regexes)."""
    return Meta(
        min_length=schema.get("minLength"),
        max_length=schema.get("maxLength"),
        pattern=schema.get("pattern"),
    )


_USER = IDENTITY_SCHEMAS["CreateUserRequest"]["properties"]
Email = Annotated[str, _pattern(_USER["email"])]
Username = Annotated[str, _pattern(_USER["username"])]
Password = Annotated[str, _pattern(_USER["password"])]
Role = Literal["owner", "admin", "member"]
Profile = Annotated[dict[str, Any], Meta(max_length=50)]
Status = Literal[tuple(s for s in STATUSES if s != "deleted")]  # type: ignore[valid-type]


class CreateUser(Struct, forbid_unknown_fields=True, gc=False):
    email: Email
    username: Username
    password: Password
    roles: Annotated[list[Role], Meta(min_length=1, max_length=3)] | UnsetType = UNSET
    profile: Profile | UnsetType = UNSET


class PatchUser(Struct, forbid_unknown_fields=True, gc=False):
    username: Username | UnsetType = UNSET
    profile: Profile | UnsetType = UNSET
    status: Status | UnsetType = UNSET


class Event(Struct, forbid_unknown_fields=True, gc=False):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=f"^{NAME_RE}$")]
    # msgspec's RFC 3339 parser in C, an offset required; it takes a little more than TS_RE
    # (a lower-case t or z, a space for the T) and rounds past 6 fraction digits.
    ts: Annotated[datetime, Meta(tz=True)] | UnsetType = UNSET
    user_id: Annotated[str, Meta(pattern=f"^{UUID_RE}$")] | UnsetType | None = UNSET
    props: Annotated[dict[str, Any], Meta(max_length=MAX_PROPS_KEYS)] | UnsetType = UNSET


class EventBatch(Struct, forbid_unknown_fields=True, gc=False):
    events: Annotated[list[Event], Meta(min_length=1, max_length=MAX_EVENTS)]


_CREATE_USER = msgspec.json.Decoder(CreateUser)
_PATCH_USER = msgspec.json.Decoder(PatchUser)
_EVENT_BATCH = msgspec.json.Decoder(EventBatch)


# orjson cannot write it, so _inexact_suspect takes any negative number near zero as suspect.
_UNPARSED = object()


def flagged(raw: bytes, walk_depth: bool = True) -> bool:
    """Whether screen() could need the parsed body: its own raw pre-filters (more brackets than
    levels allowed, an escape, a card's shape, a number that may not be stored exactly)."""
    runs = _digit_runs(raw)
    return (
        (walk_depth and raw.count(b"{") + raw.count(b"[") > MAX_DEPTH)
        or b"\\" in raw
        or _card_shaped(raw, runs)
        or _inexact_suspect(raw, runs, _UNPARSED)
    )


def screen_lazily(raw: bytes, walk_depth: bool = True) -> None:
    """screen() as a Struct-decoding path would call it: a generic parse (orjson) only for a
    body the raw pre-filters flag, which none of the measured bodies is (check() asserts it)."""
    if flagged(raw, walk_depth):
        screen(orjson.loads(raw), raw, walk_depth=walk_depth)


def _refused(message: str) -> ValidationFailed:
    return ValidationFailed([{"field": "", "message": message}])


def msgspec_create_user(raw: bytes) -> CreateUser:
    try:
        body = _CREATE_USER.decode(raw)
    except msgspec.ValidationError as exc:
        raise _refused(str(exc)) from None
    screen_lazily(raw)
    if body.roles is not UNSET and len(set(body.roles)) != len(body.roles):  # uniqueItems
        raise _refused("roles: must be unique")
    return body


def msgspec_patch_user(raw: bytes) -> PatchUser:
    try:
        body = _PATCH_USER.decode(raw)
    except msgspec.ValidationError as exc:
        raise _refused(str(exc)) from None
    screen_lazily(raw)
    if body.username is UNSET and body.profile is UNSET and body.status is UNSET:
        raise _refused("at least one field")  # minProperties: 1
    return body


_EMPTY_PROPS = b"\x01{}"


def msgspec_events(raw: bytes) -> tuple[list[CopyRecord], MinuteCounts]:
    """parse_batch's result (COPY records, per-minute counts) from a Struct-decoded batch."""
    try:
        batch = _EVENT_BATCH.decode(raw)
    except msgspec.ValidationError as exc:
        raise _refused(str(exc)) from None
    screen_lazily(raw, walk_depth=False)
    lo, hi = NOW - MAX_SKEW, NOW + MAX_SKEW
    now_us = pg_micros(NOW)
    records: list[CopyRecord] = []
    counts: MinuteCounts = {}
    untimed: dict[str, int] = {}
    for event in batch.events:
        props = event.props
        if props is UNSET:
            props_json = _EMPTY_PROPS
        else:
            props_json = b"\x01" + orjson.dumps(props)
            if (
                len(props_json) > MAX_PROPS_BYTES + 1
                or (b"\\u0000" in props_json and _has_nul(props))
                or (
                    len(props_json) > 2 * PROPS_DEPTH
                    and props_json.count(b"{") + props_json.count(b"[") > PROPS_DEPTH
                    and too_deep(props, PROPS_DEPTH)
                )
            ):
                raise _refused("props")
        user_id = None if event.user_id is UNSET else event.user_id
        ts = event.ts
        if ts is UNSET:
            records.append((TENANT, now_us, event.name, user_id, props_json))
            untimed[event.name] = untimed.get(event.name, 0) + 1
        else:
            ts = ts.astimezone(UTC)
            if not lo <= ts <= hi:
                raise _refused("ts: must be within 24 hours of now")
            records.append((TENANT, pg_micros(ts), event.name, user_id, props_json))
            key = (TENANT, event.name, ts.replace(second=0, microsecond=0))
            counts[key] = counts.get(key, 0) + 1
    minute = NOW.replace(second=0, microsecond=0)
    for name, n in untimed.items():
        key = (TENANT, name, minute)
        counts[key] = counts.get(key, 0) + n
    return records, counts


# -- today's path (server/validation.py read_json / read_raw_json, less the socket) ------------


def today_create_user(raw: bytes) -> dict[str, Any]:
    data = orjson.loads(raw)
    screen(data, raw)
    result: dict[str, Any] = validators.validate("CreateUserRequest", data)
    return result


def today_patch_user(raw: bytes) -> dict[str, Any]:
    data = orjson.loads(raw)
    screen(data, raw)
    result: dict[str, Any] = validators.validate("PatchUserRequest", data)
    return result


def today_events(raw: bytes) -> tuple[list[CopyRecord], MinuteCounts]:
    data = orjson.loads(raw)
    screen(data, raw, walk_depth=False)
    return parse_batch(data, TENANT, NOW)


def screen_only(raw: bytes, walk_depth: bool) -> Callable[[bytes], None]:
    """screen() alone, on the body parsed once beforehand: the part both paths keep."""
    data = orjson.loads(raw)
    return lambda body: screen(data, body, walk_depth=walk_depth)


EVENTS = events_body()
# name -> (body, today's path, msgspec's path, screen() alone: included in both)
CASES: dict[
    str, tuple[bytes, Callable[[bytes], Any], Callable[[bytes], Any], Callable[[bytes], Any]]
] = {
    "POST /v1/events (100 events)": (
        EVENTS,
        today_events,
        msgspec_events,
        screen_only(EVENTS, walk_depth=False),
    ),
    "POST /v1/users": (
        CREATE_USER,
        today_create_user,
        msgspec_create_user,
        screen_only(CREATE_USER, True),
    ),
    "PATCH /v1/users/{id}": (
        PATCH_USER,
        today_patch_user,
        msgspec_patch_user,
        screen_only(PATCH_USER, True),
    ),
}
PATHS = ("today", "msgspec", "screen")


def check() -> None:
    """Both paths accept the bodies, agree on what they hold, and refuse the same bad ones."""
    assert not (flagged(EVENTS, walk_depth=False) or flagged(CREATE_USER) or flagged(PATCH_USER))
    records_today, counts_today = today_events(EVENTS)
    records_msgspec, counts_msgspec = msgspec_events(EVENTS)
    assert records_today == records_msgspec and counts_today == counts_msgspec
    assert msgspec.structs.asdict(msgspec_create_user(CREATE_USER)) == today_create_user(
        CREATE_USER
    )
    patched = msgspec.structs.asdict(msgspec_patch_user(PATCH_USER))
    assert {k: v for k, v in patched.items() if v is not UNSET} == today_patch_user(PATCH_USER)
    bad = [
        (CREATE_USER.replace(b'"grace"', b'"-grace"'), today_create_user, msgspec_create_user),
        (CREATE_USER.replace(b'"member"', b'"admin"'), today_create_user, msgspec_create_user),
        (PATCH_USER.replace(b'"username"', b'"nickname"'), today_patch_user, msgspec_patch_user),
        (b"{}", today_patch_user, msgspec_patch_user),
        (EVENTS.replace(b"page_view", b"9page"), *_events()),
        (
            EVENTS.replace(b"2026-12-07", b"2026-12-01"),
            *_events(),
        ),
        (CREATE_USER.replace(b"Grace Hopper", b"4111 1111 1111 1111"), *_users()),
    ]
    for body, today, other in bad:
        for path in (today, other):
            try:
                path(body)
            except ValidationFailed:
                continue
            raise AssertionError(f"{path.__name__} accepted {body[:80]!r}")


def _events() -> tuple[Callable[[bytes], Any], Callable[[bytes], Any]]:
    return today_events, msgspec_events


def _users() -> tuple[Callable[[bytes], Any], Callable[[bytes], Any]]:
    return today_create_user, msgspec_create_user


# -- measuring ----------------------------------------------------------------------------------


def times(rounds: int, seconds: float) -> dict[tuple[str, str], float]:
    """µs per body, the best of `rounds` rounds that alternate the two paths."""
    best: dict[tuple[str, str], float] = {}
    for case, (body, *fns) in CASES.items():
        for fn in fns:
            fn(body)  # warm: compiled patterns, caches
        number = max(1, int(seconds / timeit.timeit(lambda b=body, f=fns[0]: f(b), number=1)))
        for _ in range(rounds):
            for path, fn in zip(PATHS, fns, strict=True):
                took = timeit.timeit(lambda b=body, f=fn: f(b), number=number) / number * 1e6
                best[(case, path)] = min(best.get((case, path), took), took)
    return best


def worker(case: str, path: str, n: int) -> None:
    """Runs under callgrind: warm up, say "ready", wait, run `n` times, say "done", wait."""
    body, *fns = CASES[case]
    fn = fns[PATHS.index(path)]
    for _ in range(50):
        fn(body)
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(n):
        fn(body)
    print("done", flush=True)
    sys.stdin.readline()


_TOTALS = re.compile(r"^totals: (\d+)", re.M)


def instructions(case: str, path: str, n: int) -> float:
    """Instructions per body: callgrind on for exactly the loop of `worker`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}", sys.executable, "-m", "bench.decode",
                "--worker", case, path, str(n),
            ],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        _control(proc.pid, "on", env)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        _control(proc.pid, "off", env)
        proc.stdin.write("\n")
        proc.stdin.close()
        if proc.wait(600) != 0:
            raise SystemExit(f"the worker for {case} / {path} failed")
        found = _TOTALS.search(out.read_text(errors="replace"))
        assert found is not None, "no totals in callgrind's output"
        return int(found[1]) / n


def _control(pid: int, action: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        ["callgrind_control", "-i", action, str(pid)], env=env, capture_output=True
    )
    if done.returncode != 0 or b"error" in done.stderr:
        raise SystemExit(f"callgrind_control failed: {done.stderr.decode(errors='replace')}")


def _n(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def table(figures: dict[tuple[str, str], float], unit: str) -> str:
    lines = [
        f"| body | bytes | today ({unit}) | msgspec ({unit}) | today / msgspec"
        f" | of which screen() ({unit}) | today / msgspec without screen() |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, (body, *_) in CASES.items():
        today, other = figures[(case, "today")], figures[(case, "msgspec")]
        shared = figures[(case, "screen")]
        lines.append(
            f"| {case} | {len(body):,} | {_n(today)} | {_n(other)} | {today / other:.2f}x"
            f" | {_n(shared)} | {(today - shared) / (other - shared):.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--rounds", type=int, default=7, help="timeit: rounds per path")
    parser.add_argument("--seconds", type=float, default=0.3, help="timeit: about, per round")
    parser.add_argument("--n", type=int, default=200, help="callgrind: bodies per count")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case, path, n = args.worker
        worker(case, path, int(n))
        return
    check()
    python = sys.version.split()[0]
    print(f"msgspec {msgspec.__version__}, orjson {orjson.__version__}, Python {python}")
    if args.instructions:
        counted = {(c, p): instructions(c, p, args.n) for c in CASES for p in PATHS}
        print(table(counted, "instructions"))
    else:
        print(table(times(args.rounds, args.seconds), "µs"))


if __name__ == "__main__":
    main()
