"""TLS: Surge's own HTTPS listener, its start-up errors, and TLS to PostgreSQL and Redis by URL."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from db.pool import open_database
from server.app import redis_client
from server.config import Config, ConfigError
from server.runner import free_port, serve_app
from server.tls import server_context

from .conftest import ROOT, Services


@dataclasses.dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path
    other_key: Path  # a key that does not belong to `cert`


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Pem:
    """A self-signed certificate for 127.0.0.1 and localhost (its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "surge-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(_key_pem(key))
    (d / "other.pem").write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    for f in ("key.pem", "other.pem"):
        (d / f).chmod(0o600)
    return Pem(d / "cert.pem", d / "key.pem", d / "other.pem")


def client_context(pem: Pem, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pem.cert))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


async def test_the_listener_serves_https_only(config: Config, pem: Pem) -> None:
    config = dataclasses.replace(
        config, port=free_port(), tls_cert_file=str(pem.cert), tls_key_file=str(pem.key)
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_app(config, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 15)
    base = f"127.0.0.1:{config.port}"
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", config.port, ssl=client_context(pem), server_hostname="127.0.0.1"
        )
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        writer.close()
        await writer.wait_closed()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://{base}/readyz", ssl=client_context(pem)) as resp:
                assert resp.status == 200
                assert await resp.json() == {
                    "status": "ready",
                    "checks": {"postgres": "ok", "redis": "ok"},
                }
            # TLS 1.2 is the floor, and still accepted
            tls12 = client_context(pem, ssl.TLSVersion.TLSv1_2)
            async with http.get(f"https://{base}/healthz", ssl=tls12) as resp:
                assert resp.status == 200
            # plain HTTP on the TLS port gets no HTTP answer
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://{base}/healthz") as resp:
                    await resp.read()
            # a client that does not trust the certificate refuses it
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.get(f"https://{base}/healthz") as resp:
                    await resp.read()
    finally:
        stop.set()
        await asyncio.wait_for(server, 15)
    assert server_context(config).minimum_version == ssl.TLSVersion.TLSv1_2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"TLS_CERT_FILE": "cert"},
            "surge: invalid configuration: TLS_KEY_FILE: TLS_CERT_FILE and TLS_KEY_FILE are set "
            "together or not at all\n",
        ),
        (
            {"TLS_KEY_FILE": "key"},
            "surge: invalid configuration: TLS_CERT_FILE: TLS_CERT_FILE and TLS_KEY_FILE are set "
            "together or not at all\n",
        ),
        (
            {"TLS_CERT_FILE": "/nonexistent/cert.pem", "TLS_KEY_FILE": "key"},
            "surge: invalid configuration: TLS_CERT_FILE: cannot read /nonexistent/cert.pem: "
            "No such file or directory\n",
        ),
        (
            {"TLS_CERT_FILE": "cert", "TLS_KEY_FILE": "/nonexistent/key.pem"},
            "surge: invalid configuration: TLS_KEY_FILE: cannot read /nonexistent/key.pem: "
            "No such file or directory\n",
        ),
        (
            {"TLS_CERT_FILE": "cert", "TLS_KEY_FILE": "other"},
            "surge: invalid configuration: TLS_CERT_FILE: cannot load the certificate and key: ",
        ),
    ],
    ids=["key-missing", "cert-missing", "cert-unreadable", "key-unreadable", "key-mismatch"],
)
def test_bad_tls_settings_stop_start_up_with_one_line(
    pem: Pem, env: dict[str, str], expected: str
) -> None:
    files = {"cert": str(pem.cert), "key": str(pem.key), "other": str(pem.other_key)}
    env = {name: files.get(value, value) for name, value in env.items()}
    started = time.monotonic()
    # No DATABASE_URL: the check comes before anything (embedded services included) starts.
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DATA_DIR": "/nonexistent/surge", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(expected)
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 10


def test_config_accepts_database_sslmode_and_rediss_urls() -> None:
    config = Config.from_env(
        {
            "DATABASE_URL": "postgresql://surge@db.example:5432/surge?sslmode=verify-full"
            "&sslrootcert=/etc/ssl/db-ca.pem",
            "REDIS_URL": "rediss://:secret@cache.example:6380/0?ssl_ca_certs=/etc/ssl/redis-ca.pem",
        }
    )
    assert config.database_url is not None and "sslmode=verify-full" in config.database_url
    assert config.redis_url is not None and config.redis_url.startswith("rediss://")
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Config.from_env({"REDIS_URL": "http://cache.example"})


@pytest.mark.parametrize(("sslmode", "server_ssl"), [("disable", False), ("prefer", None)])
async def test_sslmode_reaches_asyncpg(
    clean: Services, sslmode: str, server_ssl: bool | None
) -> None:
    """The URL goes to asyncpg untouched: sslmode decides whether the session is encrypted."""
    sep = "&" if "?" in clean.dsn else "?"
    db = await open_database(
        f"{clean.dsn}{sep}sslmode={sslmode}",
        min_size=1,
        max_size=1,
        acquire_timeout=5,
        command_timeout=5,
    )
    try:
        used = await db.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        offered = await db.fetchval("SELECT current_setting('ssl') = 'on'")
    finally:
        await db.close()
    assert used is (offered if server_ssl is None else server_ssl)


async def test_sslmode_require_is_enforced(clean: Services) -> None:
    sep = "&" if "?" in clean.dsn else "?"
    con = await asyncpg.connect(clean.dsn)
    try:
        offered = await con.fetchval("SELECT current_setting('ssl') = 'on'")
    finally:
        await con.close()
    dsn = f"{clean.dsn}{sep}sslmode=require"
    if offered:  # a server with TLS: the session is encrypted
        db = await open_database(dsn, min_size=1, max_size=1, acquire_timeout=5, command_timeout=5)
        try:
            assert await db.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        finally:
            await db.close()
    else:  # CI's PostgreSQL has ssl=off: require must refuse to fall back to plain text
        with pytest.raises((ConnectionError, OSError, asyncpg.PostgresError), match="SSL"):
            await open_database(dsn, min_size=1, max_size=1, acquire_timeout=5, command_timeout=5)


def _redis_server_with_tls() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(
                "redis-server is missing (apt-get install redis-server): .ci/run installs it"
            )
        pytest.skip("redis-server (Debian's, built with TLS) is not installed")
    return path


@pytest.fixture
def tls_redis(pem: Pem, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with (tmp_path / "redis.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                _redis_server_with_tls(),
                "--port", "0",
                "--tls-port", str(port),
                "--bind", "127.0.0.1",
                "--tls-cert-file", str(pem.cert),
                "--tls-key-file", str(pem.key),
                "--tls-ca-cert-file", str(pem.cert),
                "--tls-auth-clients", "no",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(tmp_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not listen"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_rediss_url_speaks_tls_to_redis(tls_redis: int, pem: Pem) -> None:
    url = f"rediss://127.0.0.1:{tls_redis}/0?ssl_ca_certs={pem.cert}"
    Config.from_env({"REDIS_URL": url})  # accepted by the settings
    redis = redis_client(url)  # the client the app builds
    try:
        assert await redis.ping() is True
        assert await redis.set("surge:tls", "1") is True
    finally:
        await redis.aclose()
    plain = redis_client(f"redis://127.0.0.1:{tls_redis}/0")
    try:
        with pytest.raises(Exception):  # noqa: B017 (redis-py raises ConnectionError or timeout)
            await plain.ping()
    finally:
        await plain.aclose()
