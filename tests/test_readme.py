"""The README's shell walk-through runs as written.

Every fenced block of README.md whose info string starts with `sh` or `bash` is run, in file
order, as one script in ONE bash process under `set -euo pipefail`, so the variables a block
sets (API, field, TENANT, TOKEN, AUTH, BOB, PRODUCT, ORDER, ...) are there for the next, exactly
as when a reader pastes them one after another into a terminal. The server is a real one with
the fake payment provider beside it, webhooks on, and the production rate limits
(tests/paying.py); the script gets its address as `API` (the README defaults it to `make run`'s
127.0.0.1:8080).

A block that is not to be run carries `no-run` after its language: ```` ```sh no-run ```` (the
`make run` / `make test` block, the locust commands). Renderers use only the first word, so the
marker does not show. A new ```sh block is run unless it says so: a snippet that needs
something the test does not start must be marked, not left to rot.

The script runs twice against the same server (a reader pasting it again), and each run must
exit 0; then the test checks what it did through the API: the order is paid, the events are
counted, the users are there.

Beside it: docs/API.md names every route of the URL map, the README links it and
docs/ARCHITECTURE.md, and no document points outside the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from .conftest import ROOT, Services
from .paying import serving_with_provider
from .served import Served, wait_until

NO_RUN = "no-run"
FENCE = re.compile(r"^```(\S*)(.*)$")


def shell_blocks(markdown: str) -> list[str]:
    """The bodies of the ```sh / ```bash blocks not marked `no-run`, in order."""
    blocks: list[str] = []
    body: list[str] | None = None
    run = False
    for line in markdown.splitlines():
        if body is None:
            m = FENCE.match(line)
            if m:
                body = []
                run = m.group(1) in ("sh", "bash") and NO_RUN not in m.group(2).split()
        elif line.strip() == "```":
            if run:
                blocks.append("\n".join(body))
            body = None
        else:
            body.append(line)
    assert body is None, "README.md: a code block is never closed"
    return blocks


# After the README's blocks: what the test reads back (the token is AUTH's last word).
TAIL = 'echo "README-STATE $TENANT $ORDER ${AUTH##* }"'


def run_script(script: str, api: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        env={**os.environ, "API": api},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def api_get(server: Served, path: str, token: str) -> Any:
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_the_extractor_keeps_order_and_skips_marked_blocks() -> None:
    md = "```sh\necho 1\n```\n```sh no-run\nmake run\n```\n```js\nx()\n```\n```bash\necho 2\n```\n"
    assert shell_blocks(md) == ["echo 1", "echo 2"]


def test_a_failing_step_fails_the_run() -> None:
    """What makes the README test worth having: under `set -euo pipefail` a step that fails,
    including inside an assignment or a pipe into `field`, stops the script with rc != 0."""
    readme_blocks = shell_blocks((ROOT / "README.md").read_text())
    field_def = readme_blocks[0].split("\n\n")[0]  # API=... and the field function
    assert "field()" in field_def
    for broken in (
        'X=$(field tenant.id <<<\'{"type":"/problems/rate-limited","status":429}\')',
        "echo '{\"items\": []}' | field items.0.id",
        "false",
    ):
        proc = run_script(f"{field_def}\n{broken}\necho REACHED", "http://127.0.0.1:9")
        assert proc.returncode != 0, broken
        assert "REACHED" not in proc.stdout
    ok = run_script(f'{field_def}\necho \'{{"a": [{{"b": 7}}]}}\' | field a.-1.b', "")
    assert ok.returncode == 0 and ok.stdout.strip() == "7", ok.stderr


def test_the_readme_walk_through_runs_as_written(services: Services, tmp_path: Path) -> None:
    for program in ("bash", "curl", "python3"):
        assert shutil.which(program), (
            f"the README's walk-through needs {program} (.ci/run installs curl)"
        )
    readme = (ROOT / "README.md").read_text()
    blocks = shell_blocks(readme)
    script = "\n\n".join(blocks)
    assert len(blocks) >= 4, "the walk-through lost its blocks"
    assert "../shared" not in readme, "the README points outside the repository"
    assert "jq " not in script, "the README promises only Python 3.11+: no jq"
    assert not re.search(r"<[a-z ]*id>", script), "a placeholder is left in a runnable block"

    with serving_with_provider(services, tmp_path) as server:
        runs = [run_script(script + "\n" + TAIL, server.url) for _ in range(2)]
        for n, proc in enumerate(runs, 1):
            assert proc.returncode == 0, f"run {n}:\n{proc.stdout}\n{proc.stderr}"
            out = proc.stdout.splitlines()
            # the answers the README's comments promise, in order
            expected = ['ETag: "1"', "412", "204", "401", "Idempotent-Replayed: true", "paid"]
            seen = [line.strip() for line in out if line.strip() in expected]
            assert seen == expected, proc.stdout
            assert '"status":428' in proc.stdout

        states = [
            line.split()[1:]
            for proc in runs
            for line in proc.stdout.splitlines()
            if line.startswith("README-STATE ")
        ]
        assert len(states) == 2 and states[0][0] != states[1][0], "one tenant per run"
        for _tenant, order_id, token in states:
            order = api_get(server, f"/v1/orders/{order_id}", token)
            assert order["status"] == "paid" and order["payment"]["status"] == "captured"
            users = api_get(server, "/v1/users", token)["items"]
            assert sorted(u["username"] for u in users) == ["ann", "bobby"]
            for name, count in (("page_view", 2), ("checkout.paid", 1)):
                buckets = api_get(server, f"/v1/analytics/counts?name={name}&bucket=1d", token)
                assert sum(b["count"] for b in buckets["buckets"]) == count, name

        # the provider's webhooks reach the server and pass its signature check
        def webhooks_accepted() -> bool:
            return any(
                line.get("route") == "/v1/webhooks/payments" and line.get("status") == 200
                for line in server.access_lines()
            )

        wait_until("a payment webhook answered 200", webhooks_accepted)


def test_docs_api_covers_every_route_and_the_readme_links_it() -> None:
    """docs/API.md is the contract for someone with only the repository: every route of the URL
    map is in it (method and path, path parameters by any name), and nothing points outside."""
    from handlers import routes

    api = (ROOT / "docs" / "API.md").read_text()
    documented = {
        (method, re.sub(r"\{[^}]*\}", "{}", path))
        for method, path in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`", api)
    }
    missing = [
        f"{r.method} {r.path}"
        for r in routes
        if (r.method, re.sub(r"\{[^}]*\}", "{}", r.path)) not in documented
    ]
    assert not missing, f"docs/API.md does not describe {missing}"
    readme = (ROOT / "README.md").read_text()
    assert "(docs/API.md)" in readme and "(docs/ARCHITECTURE.md)" in readme
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "../shared" not in doc.read_text(), f"{doc.name} points outside the repository"
