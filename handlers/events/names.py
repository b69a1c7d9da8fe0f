"""The bounded vocabulary of event names per tenant (EVENTS_MAX_NAMES_PER_TENANT).

Every distinct name is a field in the tenant's Redis counter hashes (counters.py) and in each
live message, so a tenant that could use names at will could grow Redis, the live poller's
reads and every stream's messages at will. Each tenant's names are a Redis set,
`<prefix>ev:names:<tenant>`; a batch that brings new names past the limit is refused whole
(422 naming each event with a new name), before anything of it is written.

Ingest's hot path is a set lookup: each process remembers the names it has seen admitted, so
Redis is asked only about a name new to this process (one script call per such batch).
"""

from __future__ import annotations

import logging
from typing import NoReturn

from redis.asyncio import Redis
from redis.exceptions import RedisError

from db.events import CopyRecord, MinuteCounts
from server import metrics
from server.errors import ValidationFailed

log = logging.getLogger("surge.events")

# KEYS[1]: the tenant's set; ARGV[1]: the limit; ARGV[2..]: names this process has not seen
# admitted. All or nothing: the new names join only if all of them fit; else they are returned.
_ADMIT = """
local new = {}
for i = 2, #ARGV do
    if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then new[#new + 1] = ARGV[i] end
end
if #new == 0 then return {} end
if redis.call('SCARD', KEYS[1]) + #new > tonumber(ARGV[1]) then return new end
redis.call('SADD', KEYS[1], unpack(new))
return {}
"""

# Names remembered per process, all tenants together; past this the memory starts over (each
# tenant's names are then asked about once more).
_KNOWN_MAX = 100_000


def names_key(prefix: str, tenant_id: str) -> str:
    return f"{prefix}ev:names:{tenant_id}"


class EventNames:
    def __init__(self, redis: Redis, prefix: str, max_names: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.max_names = max_names
        self._known: dict[str, set[str]] = {}
        self._size = 0
        self._failing = False
        self._script = redis.register_script(_ADMIT)

    def unknown(self, tenant_id: str, counts: MinuteCounts) -> list[str]:
        """The names of a batch (its counts' keys) this process has not seen admitted."""
        known = self._known.get(tenant_id)
        if known is None:
            return list({name for _, name, _ in counts})
        return list({name for _, name, _ in counts if name not in known})

    async def admit(self, tenant_id: str, names: list[str], records: list[CopyRecord]) -> None:
        """ValidationFailed naming each event whose name would take the tenant past the limit.

        A Redis that fails admits the names unremembered (they are asked about again): the
        events are stored in PostgreSQL whatever Redis's state, and the counters the limit
        protects are not being written either then."""
        try:
            refused = await self._script(
                keys=[names_key(self.prefix, tenant_id)], args=[self.max_names, *names]
            )
        except (RedisError, OSError) as exc:
            metrics.EVENT_COUNTER_ERRORS.inc()
            if not self._failing:  # once per outage
                log.warning("event names not checked against Redis; admitted (%s)", exc)
            self._failing = True
            return
        self._failing = False
        if refused:
            metrics.EVENT_NAMES_REFUSED.inc()
            self._refuse({n.decode() if isinstance(n, bytes) else n for n in refused}, records)
        if self._size + len(names) > _KNOWN_MAX:
            self._known.clear()
            self._size = 0
        self._known.setdefault(tenant_id, set()).update(names)
        self._size += len(names)

    def _refuse(self, refused: set[str], records: list[CopyRecord]) -> NoReturn:
        message = (
            f"is a new event name, and this tenant has used the most allowed "
            f"({self.max_names} distinct names)"
        )
        raise ValidationFailed(
            [
                {"field": f"events[{i}].name", "message": message}
                for i, record in enumerate(records)
                if record[2] in refused
            ],
            "the batch brings more distinct event names than this tenant may use",
        )
