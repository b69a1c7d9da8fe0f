"""The access log: one JSON line per request, written in batches off the request path."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import IO
from uuid import UUID

import msgspec

from server.logs import ISO_SECONDS

log = logging.getLogger("surge")


class AccessLine(msgspec.Struct, omit_defaults=True, gc=False):
    """One access-log line; its fields are the line's keys, in this order. Untracked by the
    garbage collector: its fields are strings, numbers and None, which cannot make a cycle."""

    # when the answer was done: seconds since the epoch until the line is flushed, then ISO 8601
    # UTC as in the application's log lines (server/logs.py)
    ts: float | str
    level: str  # "info", or "error" for a 5xx
    # always "surge.access": every line on stdout and stderr has ts, level, logger and msg
    logger: str
    msg: str  # always "request": tells these lines from the application's log lines
    method: str
    route: str  # the route's template ("unmatched" for no route)
    path: str
    status: int
    duration_ms: float
    request_id: str
    tenant: UUID | None
    trace_id: str | None = None  # left out when there is none


class AccessLog:
    """A request only appends its AccessLine to `pending`; the lines are encoded together (one
    msgspec call) and written every flush_s (`run`, started with the app), at max_pending
    lines, and at shutdown. A write per request would be a system call per request under
    PYTHONUNBUFFERED, as containers usually run (docs/PERFORMANCE.md has the measurements).
    """

    def __init__(
        self, stream: IO[bytes] | None = None, *, max_pending: int = 1024, flush_s: float = 0.5
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer
        self.max_pending = max_pending
        self.flush_s = flush_s
        self.pending: list[AccessLine] = []  # the chain appends to this very list
        # Requests read perf_counter(); their wall-clock time is that plus this offset, read
        # again at every flush instead of a time.time() call per request.
        self.wall = time.time() - time.perf_counter()
        self._encode_lines = msgspec.json.Encoder().encode_lines

    def flush(self) -> None:
        self.wall = time.time() - time.perf_counter()
        pending = self.pending
        if not pending:
            return
        stamp_iso(pending)
        lines = self._encode_lines(pending)
        pending.clear()
        try:
            self.stream.write(lines)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # stdout closed or gone: the requests go on
            log.error("%d access log lines could not be written: %s", lines.count(b"\n"), exc)

    async def run(self) -> None:
        """Flush every flush_s until cancelled."""
        while True:
            await asyncio.sleep(self.flush_s)
            self.flush()


def stamp_iso(pending: list[AccessLine]) -> None:
    """Each line's epoch seconds as ISO 8601 UTC with milliseconds; the date and time are
    formatted once per second of the batch, not once per line."""
    second, prefix = -1, ""
    for line in pending:
        ts = line.ts
        if isinstance(ts, str):
            continue
        whole = int(ts)
        if whole != second:
            second, prefix = whole, time.strftime(ISO_SECONDS, time.gmtime(whole))
        line.ts = f"{prefix}.{int((ts - whole) * 1000):03d}Z"
