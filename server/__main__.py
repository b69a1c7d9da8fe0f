"""surge {serve,migrate,outbox,env,demo} (also `python -m server ...`)"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from types import ModuleType

from server import logs
from server.config import Config, ConfigError, settings_table
from server.devservices import DevServiceError
from server.version import version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="surge",
        description="Surge: a multi-tenant JSON API backend. Settings come from the environment.",
    )
    parser.add_argument("--version", action="version", version=f"surge {version()}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    serve = sub.add_parser("serve", help="apply migrations, then serve HTTP until SIGTERM")
    serve.add_argument("--host", help="overrides HOST")
    serve.add_argument("--port", type=int, help="overrides PORT")
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the port (overrides WORKERS; default: one per usable core)",
    )
    serve.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    sub.add_parser("migrate", help="apply pending migrations and exit")
    outbox = sub.add_parser("outbox", help="the outbox stream: `outbox replay --help`")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", metavar="command", required=True)
    replay = outbox_sub.add_parser(
        "replay", help="publish the relayed outbox events of a time range to the stream again"
    )
    replay.add_argument("--since", required=True, help="RFC 3339 time, e.g. 2026-12-07T10:00:00Z")
    replay.add_argument("--until", help="RFC 3339 time (excluded; default: all relayed since)")
    sub.add_parser("env", help="print every environment variable with its default")
    demo = sub.add_parser("demo", help="fill a demo tenant on a running server, print a login")
    demo.add_argument("--url", help="the server's base URL (default: http://HOST:PORT)")
    args = parser.parse_args(argv)

    if args.command == "env":
        lines = "".join(f"{name}={default}\t# {doc}\n" for name, default, doc in settings_table())
        try:
            sys.stdout.write(lines)
            sys.stdout.flush()
        except BrokenPipeError:  # `surge env | head`: the reader has all it wanted
            # Python's documented remedy: point stdout at devnull so the flush at exit is quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"surge: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo":  # a client of the running server over HTTP: no services here
        from server import demo as demo_cmd

        return demo_cmd.run(args.url or demo_cmd.default_url(config))
    logs.configure(config.log_level, config.log_format)

    import asyncpg

    from db.migrate import MigrationError
    from server import runner  # imported late: uvloop and the app are not needed for `env`

    try:
        return _run(args, config, runner)
    except ConfigError as exc:  # found at start-up: an unreadable certificate, say
        print(f"surge: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"surge: migrations refused: {exc}", file=sys.stderr)
        return 1
    except (runner.StartupError, DevServiceError) as exc:
        print(f"surge: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # PostgreSQL or Redis refused us at start: say which error, in one line
        print(f"surge: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, config: Config, runner: ModuleType) -> int:

    if args.command == "serve":
        if args.host:
            config = dataclasses.replace(config, host=args.host)
        if args.port is not None:
            config = dataclasses.replace(config, port=args.port)
        if args.workers is not None:
            if not 1 <= args.workers <= 1024:
                print("surge: --workers must be between 1 and 1024", file=sys.stderr)
                return 2
            config = dataclasses.replace(config, workers=args.workers)
        code: int = runner.run_serve(config, worker_of=args.worker_of)
        return code
    if args.command == "migrate":
        applied = runner.run_migrate(config)
        print(
            f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "")
        )
        return 0
    if args.command == "outbox":
        from server import outbox_stream

        return outbox_stream.replay_command(
            config, args.since, args.until, resolve=runner.resolve_services
        )
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
