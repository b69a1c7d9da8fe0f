from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.config import Config, ConfigError, settings_table

from .conftest import ROOT


@pytest.mark.parametrize(
    ("env", "name", "fragment"),
    [
        ({"PORT": "abc"}, "PORT", "expected an integer"),
        ({"PORT": "70000"}, "PORT", "between 0 and 65535"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL", "postgresql"),
        ({"DATABASE_URL": "postgresql://h:notaport/db"}, "DATABASE_URL", "malformed"),
        ({"DATABASE_URL": "postgresql:///db"}, "DATABASE_URL", "no host"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL", "redis"),
        ({"RATE_LIMIT_BACKEND": "memcached"}, "RATE_LIMIT_BACKEND", "one of local, redis"),
        ({"RATE_LIMIT_RATE": "fast"}, "RATE_LIMIT_RATE", "expected a number"),
        ({"ACCESS_LOG": "maybe"}, "ACCESS_LOG", "true/false"),
        ({"PG_POOL_MIN": "20", "PG_POOL_MAX": "10"}, "PG_POOL_MIN", "PG_POOL_MAX"),
        ({"JWT_KEYS": "nokid"}, "JWT_KEYS", "kid:secret"),
        ({"JWT_KEYS": "k1:short"}, "JWT_KEYS", "shorter than 32"),
        ({"HOST": "  "}, "HOST", "must not be empty"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], name: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert info.value.name == name
    assert str(info.value).startswith(f"{name}: ")
    assert fragment in str(info.value)


def test_defaults_and_casts() -> None:
    config = Config.from_env(
        {"PORT": "9000", "ACCESS_LOG": "off", "RATE_LIMIT_RATE": "2.5", "DATABASE_URL": ""}
    )
    assert config.port == 9000
    assert config.access_log is False
    assert config.rate_limit_rate == 2.5
    assert config.database_url is None
    assert config.host == "127.0.0.1"
    assert Config.from_env({}) == Config()


def test_secrets_are_masked_in_repr() -> None:
    config = Config.from_env(
        {"DATABASE_URL": "postgresql://u:hunter2@db/x", "JWT_KEYS": "a:" + "s" * 32}
    )
    text = repr(config)
    assert "hunter2" not in text
    assert "s" * 32 not in text
    assert "database_url='********'" in text


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, _default, _doc in settings_table():
        assert f"`{name}`" in readme, f"{name} is missing from the README's table"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PORT": "abc"}, "surge: invalid configuration: PORT: expected an integer, got 'abc'\n"),
        ({"DATABASE_URL": "nonsense"}, "surge: invalid configuration: DATABASE_URL: "),
    ],
)
def test_process_exits_2_with_one_line(env: dict[str, str], expected: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(expected)
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_help_lists_the_commands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0
    for command in ("serve", "migrate"):
        assert command in proc.stdout


def test_env_into_a_closed_pipe_is_quiet() -> None:
    """`python -m server env | head -1`: the reader leaves early; no BrokenPipeError traceback.
    The pipe's reading end is closed before the command starts, so every write meets EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "server", "env"],
            cwd=ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 0
