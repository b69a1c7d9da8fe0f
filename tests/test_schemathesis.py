"""The served /openapi.json against the real server: schemathesis with every check, run the way a
user runs it (its CLI, with the project's schemathesis.toml: fixed seed, bounded examples, no
state carried between runs), finds nothing, and tested every operation in every phase."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from handlers import SPEC

from .conftest import ROOT


def test_schemathesis_finds_nothing(server_url: str, tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    proc = subprocess.run(
        [
            # every check but use_after_free: DELETE /v1/users/{id} is a soft delete by contract
            sys.executable, "-m", "schemathesis.cli", "run", "--checks", "all",
            "--exclude-checks", "use_after_free", "--no-color",
            "--report", "json", "--report-json-path", str(report),
            f"{server_url}/openapi.json",
        ],
        cwd=ROOT,  # schemathesis.toml
        capture_output=True,
        text=True,
        timeout=100,
    )  # fmt: skip
    assert report.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    run = json.loads(report.read_text())
    assert run["failures"] == [] and run["errors"] == [], proc.stdout[-8000:]
    assert proc.returncode == 0 and run["complete"], proc.stdout[-4000:] + proc.stderr[-2000:]
    assert run["seed"] == 18  # the config was read
    # every operation but GET /openapi.json, the document itself
    operations = sum(len(ops) for ops in SPEC["paths"].values()) - 1
    assert run["operations"] == {
        "total": operations,
        "selected": operations,
        "tested": operations,
        "errored": 0,
        "skipped": 0,
        "skip_reasons": [],
    }
    # Every phase ran: examples sends the document's own request examples.
    assert {name: p["status"] for name, p in run["phases"].items()} == {
        "examples": "success",
        "coverage": "success",
        "fuzzing": "success",
        "stateful": "success",
    }
    warnings = run["warnings"]
    # Every [[operations]] of schemathesis.toml names an operation; auth worked; every pattern
    # was understood.
    assert warnings["unmatched_filter"] == [], warnings["unmatched_filter"]
    assert warnings["missing_auth"] == [] and not run["auth"]["reauth_broke"]
    assert warnings["unsupported_regex"] == [], warnings["unsupported_regex"]
