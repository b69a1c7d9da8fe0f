"""Every line a Surge process writes, on stdout (access log) and stderr (application log), is a
JSON object with ts, level, logger and msg: what a log pipeline reading a container's output
can rely on. The tests that run a real server check its whole output with this at the end."""

from __future__ import annotations

import json

LOG_KEYS = frozenset({"ts", "level", "logger", "msg"})


def not_json_log(text: str) -> list[str]:
    """The lines of `text` that are not a JSON object with ts, level, logger and msg (the
    application's log lines, server/logs.py, and the access lines, server/access_log.py)."""
    bad = []
    for line in text.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not (isinstance(parsed, dict) and parsed.keys() >= LOG_KEYS):
            bad.append(line)
    return bad


def assert_json_log(text: str, where: str) -> None:
    bad = not_json_log(text)
    assert not bad, f"{where}: {len(bad)} lines are not JSON log lines:\n" + "\n".join(bad[:20])
