"""A span per SQL statement: the pool's connection class while tracing is on.

Imported only when OTEL_EXPORTER_OTLP_ENDPOINT is set (db/pool.py); with tracing off the pool
uses asyncpg's own Connection and nothing here runs. A statement gets a span only under a
recording span (a traced request): background loops (relay, event writer, partitions) would
otherwise start a trace of their own every round.

The span is named after the statement's `-- name:` (db/queries.py NAMES). No attribute holds a
parameter, the query text, or an error message (asyncpg's DataError messages quote the value).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, get_current_span

from db.queries import name_of

_ERROR = Status(StatusCode.ERROR)

Method = Callable[..., Awaitable[Any]]


def _traced(method: Method) -> Any:  # Any: it stands in for overloaded asyncpg methods
    async def traced(self: TracedConnection, query: str, *args: Any, **kwargs: Any) -> Any:
        if not get_current_span().is_recording():
            return await method(self, query, *args, **kwargs)
        name = name_of(query)
        attributes = self._attributes.get(name)
        if attributes is None:  # bounded: statement names and a few leading keywords
            attributes = self._attributes[name] = {
                **self._base_attributes,
                "db.query.summary": name,
            }
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        try:
            return await method(self, query, *args, **kwargs)
        except BaseException as exc:
            span.set_status(_ERROR)
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            span.end()

    traced.__name__ = method.__name__
    return traced


class TracedConnection(asyncpg.Connection):
    _tracer: Tracer
    _base_attributes: dict[str, str]
    _attributes: dict[str, dict[str, str]]

    fetch = _traced(asyncpg.Connection.fetch)
    fetchrow = _traced(asyncpg.Connection.fetchrow)
    fetchval = _traced(asyncpg.Connection.fetchval)
    fetchmany = _traced(asyncpg.Connection.fetchmany)
    execute = _traced(asyncpg.Connection.execute)  # also BEGIN/COMMIT/ROLLBACK of transactions
    executemany = _traced(asyncpg.Connection.executemany)


def connection_class(tracer: Tracer, pool_name: str) -> type[asyncpg.Connection]:
    """A TracedConnection subclass bound to this pool's tracer (asyncpg wants a class)."""
    attrs = {
        "_tracer": tracer,
        "_base_attributes": {
            "db.system.name": "postgresql",
            "db.client.connection.pool.name": pool_name,
        },
        "_attributes": {},
    }
    return type("TracedConnection", (TracedConnection,), attrs)
