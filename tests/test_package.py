"""The package: a wheel built from this checkout installs, and `surge` runs outside the checkout.

The wheel is installed with --no-deps into a fresh venv that sees this venv's site-packages
through a .pth line (the dependencies are already there; installing them again would only
measure the package index). Nothing of the checkout is on the installed server's path: it runs
from a temporary directory, and the SQL it reads is the wheel's own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from handlers.api import SPEC
from server.version import version

from .conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of what the image's build context holds (.dockerignore), so the
    checkout gets no build/ or egg-info and the wheel needs nothing else."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    shutil.copy(ROOT / "pyproject.toml", source)
    for name in ("server", "handlers", "db", "sql"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, source, cwd=out)
    (built,) = out.glob("surge-*.whl")
    return built


def test_the_version_is_pyprojects_everywhere() -> None:
    assert version() == PROJECT["version"]
    assert SPEC["info"]["version"] == PROJECT["version"]


def test_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(p.relative_to(ROOT))
        for pkg in ("server", "handlers", "db")
        for p in (ROOT / pkg).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    expected |= {"db/" + str(p.relative_to(ROOT)) for p in (ROOT / "sql").rglob("*.sql")}
    assert expected <= names, f"left out of the wheel: {sorted(expected - names)}"
    assert "handlers/graphql/explorer.html" in names and "db/sql/migrations/0001_init.sql" in names
    assert not {n for n in names if n.split("/")[0] in ("tests", "bench", "deploy", "sql")}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "surge = server.__main__:main" in scripts


def test_installed_surge_runs_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                    cwd=tmp_path).strip())  # fmt: skip
    # the dependencies: this venv's site-packages, after the new venv's own
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = (sys.executable, "-m", "pip", "--python", python)
    run(*pip, "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    surge = venv / "bin" / "surge"

    assert run(surge, "--version", cwd=tmp_path, env=env) == f"surge {PROJECT['version']}\n"
    settings = run(surge, "env", cwd=tmp_path, env=env)
    assert any(line.startswith("DATABASE_URL=") for line in settings.splitlines())

    where = run(python, "-c", "import server, db.queries as q, db.migrate as m; "
                "print(server.__file__, q.SQL_DIR, len(m.discover()), sep='\\n')",
                cwd=tmp_path, env=env).split()  # fmt: skip
    assert all(Path(p).is_relative_to(site) for p in where[:2]), where
    assert int(where[2]) == len(list((ROOT / "sql" / "migrations").glob("*.sql")))
    # the whole app imports: every db module loads its SQL, the explorer page is read
    loads = "import server.app, handlers.graphql.routes as r, db.queries as q; print(len(q.NAMES))"
    assert int(run(python, "-c", loads, cwd=tmp_path, env=env)) > 50


def test_make_refuses_a_python_older_than_3_11_and_leaves_no_venv(tmp_path: Path) -> None:
    """A stand-in interpreter that is 3.10: one line, exit non-zero, no half-made venv."""
    old = tmp_path / "python3.10"
    old.write_text(
        "#!/bin/sh\n"
        'case "$1" in -V) echo "Python 3.10.13";; -c) exit 1;; *) echo "made a venv" >&2;; esac\n'
    )
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", "-C", str(ROOT), "--no-print-directory", f"PYTHON={old}", f"VENV={venv}", "run"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stdout == ""
    first = done.stderr.splitlines()[0]
    assert first == (
        f"surge needs Python 3.11 or newer; {old} is Python 3.10.13: make PYTHON=python3.11 ..."
    )
    assert not venv.exists()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_dependency_with_its_hash() -> None:
    text = (ROOT / "requirements.lock").read_text()
    pins = re.findall(r"^([\w.-]+)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", text, re.M)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 2 * len(pins), "every pin: name==version, then its --hash line"
    locked = {_canonical(name) for name, _, _ in pins}
    wanted = [*PROJECT["dependencies"], *(d for deps in PROJECT["optional-dependencies"].values()
                                          for d in deps)]  # fmt: skip
    names = {_canonical(re.match(r"[\w.-]+", d)[0]) for d in wanted}  # type: ignore[index]
    assert names <= locked, f"not in requirements.lock: {names - locked}"
    assert "aiolimiter" not in locked and "surge" not in locked
